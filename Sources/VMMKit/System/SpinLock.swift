import Synchronization

/// A lock for state held a few instructions at a time on the exit path (a
/// device's registers, an output buffer): one atomic compare-and-exchange
/// takes it and a plain release store gives it back, inline. A
/// `pthread_mutex_t` costs two calls into libc and a second atomic
/// instruction to release it (~60 instructions per lock/unlock pair, and the
/// mutex in a cache line of its own).
///
/// A waiter spins briefly, then yields its CPU until the holder is done; it
/// never sleeps. So: not reentrant, no condition variable, and never held
/// across anything that can take long — a host write, a wait, a callback
/// into code that takes other locks (use ``ConditionLock`` there).
struct SpinLock: ~Copyable, Sendable {
    private let word = Atomic<UInt32>(0)

    /// An unlocked lock.
    init() {}

    /// Takes the lock.
    @inline(__always)
    borrowing func lock() {
        if word.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged { return }
        lockContended()
    }

    @inline(never)
    private borrowing func lockContended() {
        var spins = 0
        while true {
            if word.load(ordering: .relaxed) == 0,
               word.compareExchange(expected: 0, desired: 1, ordering: .acquiring).exchanged { return }
            spins &+= 1
            if spins < 100 { Sys.spinHint() } else { Sys.yieldProcessor() }
        }
    }

    /// Gives the lock back (a release store).
    @inline(__always)
    borrowing func unlock() { word.store(0, ordering: .releasing) }

    /// Runs `body` with the lock held.
    @inline(__always)
    borrowing func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }
}
