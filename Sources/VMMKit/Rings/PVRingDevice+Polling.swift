import Synchronization

// The polling consumer (``PVRingPolling``): a service thread that drains the rings while entries come, sleeps
// when idle and tells producers through the headers' polling and wake flags (io_uring's SQPOLL).
extension PVRingDevice {
    // MARK: polling consumer

    /// Host CPU time the polling thread has used, in nanoseconds, summed over
    /// the VM's runs (updated each time it goes to sleep and when it ends, so
    /// exact once the VM has stopped).
    public var pollerCPUNanoseconds: UInt64 { poller.cpu.load(ordering: .acquiring) }

    /// How many times the poller went to sleep after an idle period (summed over the VM's runs).
    public var pollerSleeps: Int { poller.sleeps.load(ordering: .relaxed) }

    /// Whether the poller is polling now (the header's polling flag).
    public var isPolling: Bool { poller.polling.load(ordering: .acquiring) }

    /// Writes to the rings' kick register (``PVRingKick``) so far: each an exit a producer took to wake an idle poller
    /// (or, on a synchronous ring, after its bounded wait ran out).
    public var kicks: Int { poller.kicks.load(ordering: .relaxed) }

    /// A write to the kick register: counted in ``kicks``, then ``wakePoller()``.
    package func noteKick() {
        poller.kicks.wrappingAdd(1, ordering: .relaxed)
        wakePoller()
    }

    /// Wakes a sleeping poller (the ring's kick register does this).
    public func wakePoller() {
        poller.noteActivity()
        wakeSleepingPoller()
    }

    func pollLoop(_ vm: VirtualMachine, _ stop: ServiceStop) {
        var cpuMark = Sys.threadCPUNanoseconds()
        defer { poller.cpu.wrappingAdd(Sys.threadCPUNanoseconds() &- cpuMark, ordering: .releasing) }
        let idle = polling.idleNanoseconds
        let spacing = max(1, polling.spinsBetweenChecks)
        var idleSince: UInt64 = 0
        var activitySeen = poller.activity.load(ordering: .relaxed)
        var spins = 0
        setPollingFlags(polling: true)
        defer { setPollingFlags(polling: false) }
        while !stop.requested && !vm.isStopping {
            if vm.isPauseRequested {
                // A pause holder owns the devices' state: sleep it out, polling off.
                setPollingFlags(polling: false)
                poller.sleep(nanoseconds: 100_000, stop: stop)
                setPollingFlags(polling: true)
                continue
            }
            if hasPending() {
                lock.lock()
                let (s, n) = drainLocked()
                lock.unlock()
                if let s { vm.finishFromService(.success(s)); return }
                if n > 0 {
                    idleSince = 0; spins = 0
                    for _ in 0..<spacing { Sys.spinHint() }
                    continue
                }
            }
            // Looking at the ring pulls its cache lines away from the producers:
            // look every few spins, so entries arrive in runs and lines move once per run.
            for _ in 0..<spacing { Sys.spinHint() }
            spins &+= 1
            if spins & 63 != 0 { continue }
            if spins & 0xffff == 0 && !vm.hasRunningVCPUs { break } // every vCPU halted: the VM is done
            let now = Sys.monotonicNanoseconds()
            // Producers that exited (a fallback, a kick, entries the exit path
            // drained itself while this thread was off its CPU) are producing:
            // the idle period starts again.
            let seen = poller.activity.load(ordering: .relaxed)
            if idleSince == 0 || seen != activitySeen { idleSince = now; activitySeen = seen; continue }
            if now &- idleSince < idle { continue }
            // Idle: clear the polling flag and raise the wake flag, then look once
            // more. A producer publishes with a locked instruction and then reads
            // the flags; this drain's seq-cst increment comes after the flag
            // store: either the drain sees the entry, or the producer sees the
            // wake flag and kicks. (A producer that saw the polling flag may
            // also just have published, or this thread was off its CPU a while.)
            // From here a kick (or any wake) is remembered, so the poller does
            // not go to sleep after one that came before it reached its sleep.
            poller.beginIdle { setPollingFlags(polling: false, wake: true) }
            lock.lock()
            let (s, n) = drainLocked()
            lock.unlock()
            if let s { vm.finishFromService(.success(s)); return }
            if n > 0 {
                poller.endIdle()
                setPollingFlags(polling: true)
                idleSince = 0; spins = 0
                continue
            }
            let cpu = Sys.threadCPUNanoseconds()
            poller.cpu.wrappingAdd(cpu &- cpuMark, ordering: .releasing)
            cpuMark = cpu
            poller.sleepUntilWoken(stop: stop, vm: vm, pending: { [self] in hasPending() })
            setPollingFlags(polling: true)
            idleSince = 0
            spins = 0
        }
    }
}

/// The poller's sleep/wake state.
final class PollerState: @unchecked Sendable {
    let polling = Atomic<Bool>(false)
    /// Set from the moment the poller goes idle (``beginIdle(_:)``, the wake
    /// flag raised) until it polls again: wakes are accepted then.
    let sleeping = Atomic<Bool>(false)
    let cpu = Atomic<UInt64>(0)
    let sleeps = Atomic<Int>(0)
    /// Kick-register writes (``PVRingDevice/kicks``).
    let kicks = Atomic<Int>(0)
    /// Bumped by exits that show a producer at work (a fallback write to a
    /// ring's target register, a kick, entries drained before an exit): the
    /// poller's idle period starts again when it changes.
    let activity = Atomic<UInt64>(0)
    private let cond = ConditionLock()
    private var woken = false

    var isSleeping: Bool { sleeping.load(ordering: .relaxed) }

    /// A producer was seen at work (a relaxed increment: the exit path stays cheap).
    @inline(__always)
    func noteActivity() { activity.wrappingAdd(1, ordering: .relaxed) }

    /// Going idle: `raiseFlags` runs under the lock, then wakes are accepted
    /// (and remembered until the poller sleeps, so none is lost).
    func beginIdle(_ raiseFlags: () -> Void) {
        cond.lock()
        raiseFlags()
        woken = false
        sleeping.store(true, ordering: .sequentiallyConsistent)
        cond.unlock()
    }

    /// Back to polling without sleeping (the last look found entries).
    func endIdle() {
        cond.lock()
        woken = false
        sleeping.store(false, ordering: .sequentiallyConsistent)
        cond.unlock()
    }

    /// Wakes the poller if it is idle (asleep or about to sleep); `whileSleeping`
    /// runs first, under the lock, only then (the poller is not writing the
    /// flags then), and only for the first wake.
    func wake(_ whileSleeping: () -> Void = {}) {
        guard sleeping.load(ordering: .acquiring) else { return }
        cond.withLock {
            guard sleeping.load(ordering: .relaxed), !woken else { return }
            whileSleeping()
            woken = true
            cond.broadcast()
        }
    }

    /// Sleeps until woken, stopped, or (checked every drain interval) entries are pending.
    func sleepUntilWoken(stop: ServiceStop, vm: VirtualMachine, pending: () -> Bool) {
        sleeps.wrappingAdd(1, ordering: .relaxed)
        cond.lock()
        while !woken && !stop.requested && !vm.isStopping {
            cond.wait(timeoutNanoseconds: PVRingDevice.drainInterval)
            if pending() || !vm.hasRunningVCPUs { break }
        }
        woken = false
        sleeping.store(false, ordering: .sequentiallyConsistent)
        cond.unlock()
    }

    /// Sleeps for a while unless woken or stopped.
    func sleep(nanoseconds: UInt64, stop: ServiceStop) {
        cond.lock()
        if !stop.requested { cond.wait(timeoutNanoseconds: nanoseconds) }
        cond.unlock()
    }
}
