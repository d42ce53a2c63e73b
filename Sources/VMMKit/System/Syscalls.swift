// Where VMMKit calls into libc and the KVM ioctl shims (with HostMemory.swift,
// HostOutput.swift, InterruptedCall.swift, ImageFile.swift, HostCPUAffinity.swift,
// ConditionLock.swift, OSThread.swift and KVM/). `open`, the `ioctl`s, `mapShared`
// and `installKickHandler` turn a failure into a typed `BackendError` naming the operation and errno; the
// others return a result or ignore failures they cannot act on. Only
// `HostOutput.write` retries EINTR by itself; the ioctl callers decide (KVM_RUN
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

extension Sys {
    /// A spin-wait hint to the CPU (`pause`), for polling loops.
    @inline(__always)
    static func spinHint() { ckvm_spin_hint() }
    /// Gives the calling thread's CPU to another runnable thread (`sched_yield`).
    static func yieldProcessor() { _ = sched_yield() }
    /// Executes a serializing instruction on the calling thread's CPU (after guest code was rewritten).
    static func serialize() { ckvm_serialize() }

    /// CPU time the calling thread has used, in nanoseconds.
    static func threadCPUNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
