import Synchronization

/// The run/stop/pause state shared by a VM's vCPU threads.
final class Control: @unchecked Sendable {
    enum Outcome {
        case stop(StopReason)
        case halted
        case error(VMError)
    }

    /// Non-zero when a vCPU must leave its fast loop (stop or pause requested).
    let requests = Atomic<Int>(0)
    static let stopBit = 1, pauseBit = 2

    private let cond = ConditionLock()
    private var running = false
    private var active = 0
    private var paused = 0
    private var pauseDepth = 0
    private var holder: UInt?
    private var pauseRequested: Bool { pauseDepth > 0 }
    private var result: Result<StopReason, VMError>?
    private var threads: [OSThread] = []

    func begin(vcpuCount: Int) -> Bool {
        cond.withLock {
            guard !running else { return false }
            running = true
            active = vcpuCount
            paused = 0
            result = nil
            requests.store(0, ordering: .sequentiallyConsistent)
            return true
        }
    }

    func setThreads(_ t: [OSThread]) { cond.withLock { threads = t } }

    /// Hands over the vCPU threads not yet joined (for a VM dropped without ``VirtualMachine/wait()``).
    func takeThreads() -> [OSThread] { cond.withLock { let t = threads; threads = []; return t } }

    var isRunning: Bool { cond.withLock { running } }

    /// Whether a vCPU thread may be inside its run loop (running, and not every vCPU has finished).
    var hasActiveVCPUs: Bool { cond.withLock { running && active > 0 } }

    func reset() { cond.withLock { running = false; pauseDepth = 0; holder = nil; threads = [] } }

    func requestStop() {
        cond.withLock {
            if result == nil, running { result = .success(.stopped) }
            requests.bitwiseOr(Control.stopBit, ordering: .sequentiallyConsistent)
            cond.broadcast()
        }
    }

    var stopRequested: Bool { requests.load(ordering: .sequentiallyConsistent) & Control.stopBit != 0 }

    /// Records a vCPU's end. The first stop or error decides the VM's result;
    /// a halted vCPU just leaves (the VM stops when all have).
    func vcpuFinished(_ outcome: Outcome) {
        cond.withLock {
            switch outcome {
            case .stop(let r):
                if result == nil { result = .success(r) }
                requests.bitwiseOr(Control.stopBit, ordering: .sequentiallyConsistent)
            case .error(let e):
                if result == nil { result = .failure(e) }
                requests.bitwiseOr(Control.stopBit, ordering: .sequentiallyConsistent)
            case .halted:
                break
            }
            active -= 1
            if active == 0 && result == nil { result = .success(.halted) }
            cond.broadcast()
        }
    }

    func waitForAll() -> Result<StopReason, VMError> {
        cond.lock()
        while active > 0 { cond.wait() }
        let t = threads
        let r = result ?? .success(.halted)
        cond.unlock()
        for th in t { th.join() }
        return r
    }

    /// Stops the VM from outside a vCPU (the timer thread): the first result wins.
    func finishExternally(_ r: Result<StopReason, VMError>) {
        cond.withLock {
            if result == nil { result = r }
            requests.bitwiseOr(Control.stopBit, ordering: .sequentiallyConsistent)
            cond.broadcast()
        }
    }

    /// Sleeps up to `nanoseconds`; returns false once the VM is stopping or every vCPU has finished.
    func sleepWhileRunning(nanoseconds: UInt64) -> Bool {
        cond.lock(); defer { cond.unlock() }
        if active == 0 || stopRequested { return false }
        cond.wait(timeoutNanoseconds: nanoseconds)
        return active > 0 && !stopRequested
    }

    /// Takes the pause for the calling thread and waits until every other
    /// active vCPU is parked. One holder at a time (it may nest); a vCPU-thread
    /// caller counts as parked while it waits, so two vCPUs pausing from their
    /// handlers take turns instead of waiting for each other. Returns false when
    /// the VM is not running or starts stopping.
    func acquirePause(selfIsVCPU: Bool, kick: () -> Void) -> Bool {
        cond.lock(); defer { cond.unlock() }
        guard running, active > 0, !stopRequested else { return false }
        let me = Sys.threadID()
        if holder == me { pauseDepth += 1; return true }
        if selfIsVCPU { paused += 1; cond.broadcast() }
        defer { if selfIsVCPU { paused -= 1 } }
        while holder != nil && !stopRequested { cond.wait(timeoutNanoseconds: 100_000_000) }
        guard !stopRequested, active > 0 else { return false }
        holder = me
        pauseDepth = 1
        requests.bitwiseOr(Control.pauseBit, ordering: .sequentiallyConsistent)
        kick()
        while paused < active && !stopRequested { cond.wait(timeoutNanoseconds: 100_000_000) }
        if stopRequested { releaseLocked(all: true); return false }
        return true
    }

    /// Gives back one level of the pause; the last one lets the vCPUs go on.
    /// Only the holder's thread can release the pause: a stray resume from
    /// another thread must not let the vCPUs run during the holder's work.
    func resume() {
        cond.withLock {
            guard holder == Sys.threadID() else { return }
            releaseLocked(all: false)
        }
    }

    private func releaseLocked(all: Bool) {
        guard pauseDepth > 0 else { return }
        pauseDepth = all ? 0 : pauseDepth - 1
        if pauseDepth == 0 {
            holder = nil
            requests.bitwiseAnd(~Control.pauseBit, ordering: .sequentiallyConsistent)
        }
        cond.broadcast()
    }

    /// Whether a pause is in force (periodic tasks wait it out).
    var isPaused: Bool { cond.withLock { pauseDepth > 0 } }

    /// Called by a vCPU thread that saw the pause bit: parks until resumed or stopped.
    func park() {
        cond.lock()
        paused += 1
        cond.broadcast()
        while pauseRequested && !stopRequested { cond.wait() }
        paused -= 1
        cond.unlock()
    }
}
