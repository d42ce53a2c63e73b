// minivmm's few libc calls: reading the image file, writing to stderr, the real-time policy.
import ArgumentParser
import VMMKit
#if canImport(Glibc)
import Glibc
#endif

func printError(_ s: String) {
    var line = s
    if !line.hasSuffix("\n") { line += "\n" }
    var bytes = Array(line.utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes.withUnsafeMutableBytes { b in b.baseAddress.map { write(2, $0 + off, b.count - off) } ?? -1 }
        if n <= 0 { return }
        off += n
    }
    bytes.removeAll()
}

func parseSize(_ s: String) -> UInt64? {
    let t = s.uppercased().filter { $0 != " " }
    guard let last = t.last else { return nil }
    let mult: UInt64
    var num = t
    switch last {
    case "K": mult = 1 << 10; num.removeLast()
    case "M": mult = 1 << 20; num.removeLast()
    case "G": mult = 1 << 30; num.removeLast()
    default: mult = 1
    }
    guard let v = UInt64(num), v > 0 else { return nil }
    let (r, o) = v.multipliedReportingOverflow(by: mult)
    return o ? nil : r
}

func readFile(_ path: String) throws -> [UInt8] {
    do { return try ImageFile.read(path) } catch { throw ValidationError(error.description) }
}

/// Nanoseconds on the monotonic clock.
func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// CPU time of the whole process (every thread, running ones included), in nanoseconds.
func processCPUNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// TSC ticks per nanosecond, measured against the monotonic clock.
func calibrateTSC() -> Double {
    let t0 = monotonicNanoseconds(), c0 = ExitPathProbe.timestamp()
    usleep(100_000)
    let t1 = monotonicNanoseconds(), c1 = ExitPathProbe.timestamp()
    return Double(c1 &- c0) / Double(t1 - t0)
}

/// The path of the running executable.
func selfExecutable() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { return CommandLine.arguments[0] }
    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The first `name` on PATH, if any.
func findExecutable(_ name: String) -> String? {
    guard let path = getenv("PATH") else { return nil }
    for dir in String(cString: path).split(separator: ":") {
        let p = "\(dir)/\(name)"
        if access(p, X_OK) == 0 { return p }
    }
    return nil
}

/// Runs a process with stdout and stderr to a temporary file; returns its status, the last `tail` bytes of its
/// output (from the first whole line in them when the output was longer; see ``OutputTail``), wall time and
/// CPU time (user + system, all its threads, from `wait4`).
func spawn(_ argv: [String], tail: Int = 64 << 10) throws -> (status: Int32, output: String, milliseconds: Double, cpuNanoseconds: Double) {
    var template = Array("/tmp/minivmm-bench-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    guard fd >= 0 else { throw ValidationError("mkstemp failed") }
    let path = String(cString: template)
    defer { close(fd); unlink(path) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, fd, 1)
    posix_spawn_file_actions_adddup2(&actions, fd, 2)
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    let cargs = argv.map { strdup($0) } + [nil]
    defer { for p in cargs { free(p) } }
    var pid = pid_t()
    let t0 = monotonicNanoseconds()
    let rc = posix_spawn(&pid, argv[0], &actions, nil, cargs, environ)
    guard rc == 0 else { throw ValidationError("cannot run \(argv[0]): \(String(cString: strerror(rc)))") }
    var status: Int32 = 0
    var usage = rusage()
    while wait4(pid, &status, 0, &usage) < 0 && errno == EINTR {}
    let ms = Double(monotonicNanoseconds() - t0) / 1e6
    func ns(_ t: timeval) -> Double { Double(t.tv_sec) * 1e9 + Double(t.tv_usec) * 1e3 }
    let output = readTail(fd, count: tail)
    let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return (code, output, ms, ns(usage.ru_utime) + ns(usage.ru_stime))
}

/// Turns Ctrl-C (SIGINT) and SIGTERM into `vm.stop()`, so the guest's output is
/// flushed and `--profile` still prints. Blocks both signals in the calling
/// thread (vCPU threads started later inherit that) and waits for them on a
/// dedicated thread. Returns a flag that is set once a signal arrived.
final class InterruptFlag: @unchecked Sendable {
    private(set) var raised = false
    fileprivate func raise() { raised = true }
}

func stopOnInterrupt(_ vm: VirtualMachine) -> InterruptFlag {
    let flag = InterruptFlag()
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    final class Box: @unchecked Sendable { let vm: VirtualMachine; let flag: InterruptFlag; var set: sigset_t
        init(_ vm: VirtualMachine, _ flag: InterruptFlag, _ set: sigset_t) { self.vm = vm; self.flag = flag; self.set = set } }
    let box = Unmanaged.passRetained(Box(vm, flag, set))
    var thread = pthread_t()
    pthread_create(&thread, nil, { arg in
        guard let arg else { return nil }
        let box = Unmanaged<Box>.fromOpaque(arg).takeRetainedValue()
        var sig: Int32 = 0
        if sigwait(&box.set, &sig) == 0 {
            box.flag.raise()
            box.vm.stop()
        }
        // A second signal while the stop is stuck (a console write to a stalled pipe): leave now.
        if sigwait(&box.set, &sig) == 0 { _exit(130) }
        return nil
    }, box.toOpaque())
    pthread_detach(thread)
    return flag
}

/// The environment variable `name`, if set.
func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
}

/// Puts the calling thread under the real-time policy `SCHED_FIFO` at `priority` (1...99); the
/// threads it creates afterwards (a VM's vCPU, ring-poller and timer threads) inherit it, so no
/// other busy host thread takes their CPUs (the host keeps a small share for them). Not applied,
/// with the reason, unless the host CPUs this process may use are at least `busyThreads` (the vCPUs
/// and the ring poller: real-time threads that spin on one CPU starve each other), or when the host
/// refuses (the errno; `EPERM` without `CAP_SYS_NICE` and with `RLIMIT_RTPRIO` below `priority`).
func becomeRealtime(priority: Int32, busyThreads: Int) -> RealtimeOutcome {
    let priority = min(max(priority, 1), 99)
    let cpus = VirtualMachine.allowedHostCPUs.count
    guard cpus >= busyThreads else {
        return RealtimeOutcome(priority: priority, refusal: .tooFewCPUs(busyThreads: busyThreads, allowed: cpus))
    }
    var p = sched_param()
    p.sched_priority = priority
    let r = pthread_setschedparam(pthread_self(), Int32(SCHED_FIFO), &p)
    guard r != 0 else { return RealtimeOutcome(priority: priority) }
    var limit = rlimit()
    let rtprio: UInt64? = getrlimit(__rlimit_resource_t(__RLIMIT_RTPRIO.rawValue), &limit) == 0 && limit.rlim_cur != rlim_t.max
        ? UInt64(limit.rlim_cur) : nil
    return RealtimeOutcome(priority: priority, refusal: .host(errno: r, text: String(cString: strerror(r)), rtprioLimit: rtprio))
}

/// The last `count` bytes of the file open at `fd`, as ``OutputTail/text`` gives them.
func readTail(_ fd: Int32, count: Int) -> String {
    let tail = OutputTail(capacity: count)
    var st = stat()
    guard fstat(fd, &st) == 0 else { return "" }
    let size = Int(st.st_size)
    var offset = max(0, size - tail.capacity)
    // The bytes before the tail count toward the total (so a cut first line is skipped).
    tail.countSkipped(offset)
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while offset < size {
        let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { break }
        buf.withUnsafeBytes { tail.append(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        offset += n
    }
    return tail.text
}
