import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A value behind a pthread mutex. (Not `Synchronization.Mutex`: its Linux
/// implementation waits on futexes directly, which ThreadSanitizer cannot see,
/// so tests run under TSan would report false races.)
final class Locked<Value>: @unchecked Sendable {
    private var value: Value
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    init(_ value: Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
