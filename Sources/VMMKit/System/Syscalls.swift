// Where VMMKit calls into libc and the KVM ioctl shims (with ImageFile.swift
// and KVM/). `open`, the `ioctl`s, `mapShared` and `installKickHandler` turn
// a failure into a typed `BackendError` naming the operation and errno; the
// others return a result or ignore failures they cannot act on. Only
// `HostOutput.write` retries EINTR here; the ioctl callers decide (KVM_RUN
// must see EINTR, KVM_CREATE_VM retries it).

import Glibc
import CKVM

enum Sys {
    @inline(__always)
    static var errno: Errno { Errno(rawValue: ckvm_errno()) }

    static func open(_ path: String, flags: Int32) throws(BackendError) -> Int32 {
        let fd = Glibc.open(path, flags | O_CLOEXEC)
        if fd < 0 { throw BackendError("open \(path)", errno: errno) }
        return fd
    }

    static func close(_ fd: Int32) { _ = Glibc.close(fd) }

    /// The name of the group that owns `path`, when that is not root's group
    /// and the group database (`/etc/group`, NSS) knows it.
    static func owningGroup(of path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0, st.st_gid != 0, let g = getgrgid(st.st_gid), let name = g.pointee.gr_name else { return nil }
        return String(cString: name)
    }

    @inline(__always)
    static func ioctl(_ fd: Int32, _ request: UInt, _ name: StaticString) throws(BackendError) -> Int32 {
        let r = ckvm_ioctl_none(fd, request)
        if r < 0 { throw BackendError(String(describing: name), errno: errno) }
        return r
    }

    @inline(__always)
    static func ioctl(_ fd: Int32, _ request: UInt, value: UInt, _ name: StaticString) throws(BackendError) -> Int32 {
        let r = ckvm_ioctl_int(fd, request, value)
        if r < 0 { throw BackendError(String(describing: name), errno: errno) }
        return r
    }

    @inline(__always)
    static func ioctl(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer, _ name: StaticString) throws(BackendError) -> Int32 {
        let r = ckvm_ioctl_ptr(fd, request, arg)
        if r < 0 { throw BackendError(String(describing: name), errno: errno) }
        return r
    }

    /// `ioctl` that returns the raw result and errno, for KVM_RUN where EINTR is not an error.
    @inline(__always)
    static func ioctlRaw(_ fd: Int32, _ request: UInt) -> (Int32, Errno) {
        let r = ckvm_ioctl_none(fd, request)
        return r < 0 ? (r, errno) : (r, Errno(rawValue: 0))
    }

    static func withStruct<T, R>(_ value: inout T, _ body: (UnsafeMutableRawPointer) throws(BackendError) -> R) throws(BackendError) -> R {
        try withUnsafeMutablePointer(to: &value) { (p) throws(BackendError) -> R in try body(UnsafeMutableRawPointer(p)) }
    }

    static func mapShared(fd: Int32, size: Int) throws(BackendError) -> UnsafeMutableRawPointer {
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw BackendError("mmap kvm_run", errno: errno)
        }
        return p
    }

    static func unmap(_ p: UnsafeMutableRawPointer, size: Int) { _ = munmap(p, size) }

    static func installKickHandler() throws(BackendError) {
        let r = ckvm_install_kick_handler()
        if r != 0 { throw BackendError("sigaction", errno: Errno(rawValue: r)) }
    }

    static func currentThread() -> pthread_t { pthread_self() }
    /// The calling thread's identity as a number.
    static func threadID() -> UInt { UInt(pthread_self()) }

    /// Marks the calling thread as running a vCPU of `vm`.
    /// The tag is the object's address (its identity while it lives), not a hash.
    static func setThreadTag(_ vm: AnyObject) { ckvm_set_thread_tag(UInt(bitPattern: ObjectIdentifier(vm))) }
    static func clearThreadTag() { ckvm_set_thread_tag(0) }
    /// Whether the calling thread runs a vCPU of `vm`.
    static func threadRunsVCPU(of vm: AnyObject) -> Bool {
        ckvm_thread_tag() == UInt(bitPattern: ObjectIdentifier(vm))
    }

    static func kick(_ thread: pthread_t) { _ = ckvm_kick_thread(thread) }

    /// Monotonic nanoseconds.
    @inline(__always)
    static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

/// Retrying a system call that a signal interrupted.
package enum InterruptedCall {
    /// Runs `body`; while it fails with `EINTR`, runs it again, at most
    /// `retries` more times, then lets the `EINTR` through.
    package static func retrying<R>(_ retries: Int, _ body: () throws(BackendError) -> R) throws(BackendError) -> R {
        var attempt = 0
        while true {
            do throws(BackendError) {
                return try body()
            } catch where error.errno == .interrupted && attempt < retries {
                attempt += 1
            }
        }
    }
}

extension Sys {
    /// A spin-wait hint to the CPU (`pause`), for polling loops.
    @inline(__always)
    static func spinHint() { ckvm_spin_hint() }

    /// CPU time the calling thread has used, in nanoseconds.
    static func threadCPUNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

/// Anonymous host memory for guest RAM.
enum HostMemory {
    static func mapAnonymous(size: Int) -> Result<UnsafeMutableRawPointer, Errno> {
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED else {
            return .failure(Errno(rawValue: ckvm_errno()))
        }
        return .success(p)
    }

    static func unmap(_ p: UnsafeMutableRawPointer, size: Int) { _ = munmap(p, size) }
}

/// A mutex with a condition variable (pthread), for pausing and joining vCPU threads.
final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    func broadcast() { pthread_cond_broadcast(cond) }
    /// Waits (lock held) until signalled or `timeoutNanoseconds` elapse.
    func wait(timeoutNanoseconds: UInt64? = nil) {
        guard let t = timeoutNanoseconds else { pthread_cond_wait(cond, mutex); return }
        let deadline = Sys.monotonicNanoseconds() &+ t
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        pthread_cond_timedwait(cond, mutex, &ts)
    }

    func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock(); defer { unlock() }
        return try body()
    }
}

/// Starts a joinable OS thread running `body` (vCPU threads).
///
/// The thread drops `body` (and what it captured) as soon as `body` returns,
/// so a finished thread keeps nothing alive; whoever owns the `OSThread`
/// then joins it, or ``joinOrDetach()`` reclaims it from a deinitializer.
final class OSThread: @unchecked Sendable {
    private var handle = pthread_t()
    private var body: (() -> Void)?

    private init(body: @escaping () -> Void) { self.body = body }

    static func start(_ body: @escaping () -> Void) throws(BackendError) -> OSThread {
        let t = OSThread(body: body)
        let unmanaged = Unmanaged.passRetained(t)
        let r = pthread_create(&t.handle, nil, { arg in
            guard let arg else { return nil }
            let t = Unmanaged<OSThread>.fromOpaque(arg).takeRetainedValue()
            t.runBody()
            return nil
        }, unmanaged.toOpaque())
        if r != 0 {
            unmanaged.release()
            throw BackendError("pthread_create", errno: Errno(rawValue: r))
        }
        return t
    }

    private func runBody() {
        if let b = body { b() }
        body = nil // may release the last reference to the VM: its deinit then runs on this thread
    }

    func join() { pthread_join(handle, nil) }

    /// Joins the thread, or detaches it when called on the thread itself
    /// (a deinitializer that runs there: the thread is about to end).
    func joinOrDetach() {
        if pthread_equal(handle, pthread_self()) != 0 { pthread_detach(handle) } else { pthread_join(handle, nil) }
    }
}

/// Writes to a host file descriptor (UART output to the terminal).
enum HostOutput {
    static func write(fd: Int32, _ bytes: UnsafeRawBufferPointer) {
        guard var p = bytes.baseAddress else { return }
        var left = bytes.count
        while left > 0 {
            let n = Glibc.write(fd, p, left)
            if n < 0 { if ckvm_errno() == EINTR { continue }; return }
            if n == 0 { return }
            p += n
            left -= n
        }
    }
}
