import Synchronization

/// A virtual machine: guest memory, vCPUs (one thread each), an I/O bus and
/// the exit chain.
///
/// ```swift
/// let vm = try VirtualMachine(backend: KVMSystem(), configuration: .init(memorySize: 64 << 20))
/// try vm.bus.attach(UART8250(sink: .standardOutput()), ports: 0x3f8..<0x400)
/// _ = try X86Boot.load(.elf(bytes), into: vm)
/// let reason = try vm.run()
/// ```
public final class VirtualMachine: @unchecked Sendable {
    /// The backend VM.
    public let backend: any VMBackend
    /// Guest memory.
    public let memory: GuestMemory
    /// The I/O bus (attach devices before ``run()``).
    public let bus = IOBus()
    /// The configuration the VM was built with.
    public let configuration: VMConfiguration
    /// The vCPUs.
    public private(set) var vcpus: [VCPU] = []
    /// The memory slots: their layout, and page guards (``MemorySlots/protect(_:)``).
    public let slots: MemorySlots
    private let guardListeners = GuardListenerBox()

    private var handlers: [any ExitHandler] = []
    private var stopHooks: [@Sendable (VirtualMachine) -> Void] = []
    private var periodicTasks: [(interval: UInt64, body: @Sendable (VirtualMachine) throws(VMError) -> StopReason?)] = []
    private var timerThread: OSThread?
    private var services: [(prepare: @Sendable () -> Void, run: @Sendable (VirtualMachine, ServiceStop) -> Void, wake: @Sendable () -> Void)] = []
    private var serviceThreads: [(thread: OSThread, stop: ServiceStop, wake: @Sendable () -> Void)] = []
    let control = Control()

    /// Creates the VM, its memory slots and its vCPUs.
    public init(backend hypervisor: any HypervisorBackend, configuration: VMConfiguration = VMConfiguration()) throws(VMError) {
        guard configuration.vcpuCount >= 1, configuration.vcpuCount <= 256 else {
            throw .invalidConfiguration("vCPU count \(configuration.vcpuCount) is not in 1...256")
        }
        guard configuration.memorySize >= 2 << 20, configuration.memorySize % 4096 == 0,
              configuration.memorySize <= 1 << 40 else {
            throw .invalidConfiguration("memory size \(configuration.memorySize) must be page aligned, ≥ 2 MiB and ≤ 1 TiB")
        }
        self.configuration = configuration
        do {
            self.backend = try hypervisor.createVM()
        } catch { throw .backend(error) }
        var layout: [(GuestRange, Bool)] = configuration.ramRanges.map { ($0, false) }
        layout += configuration.extraRegions.map { ($0.range, $0.readOnly) }
        do {
            self.memory = try GuestMemory(ranges: layout)
        } catch { throw .memory(error) }
        do {
            self.slots = try MemorySlots(backend: backend, memory: memory, granularity: configuration.slotGranularity,
                                         logDirtyPages: configuration.logDirtyPages)
        } catch { throw VMError(error) }
        do {
            // Intel VMX needs three pages for a real-mode TSS; put them just below 4 GiB, out of RAM.
            try? backend.setTSSAddress(0xfffb_d000)
            if configuration.inKernelIRQChip { try backend.createIRQChip() }
            if configuration.userSpaceMSRExits {
                try backend.enableCapability(KVMCapability.x86UserSpaceMSR, args: [KVMCapability.msrExitReasonUnknown])
            }
            for i in 0..<configuration.vcpuCount {
                vcpus.append(VCPU(id: i, backend: try backend.createVCPU(id: i)))
            }
        } catch { throw .backend(error) }
        slots.gate = self
        // Weak: the listener (DMP) holds objects that hold guest memory (its rings, enable words), so a
        // strong capture made a cycle that leaked the listener, the memory and the rings with the VM.
        memory.setHostWriteObserver { [weak listeners = guardListeners] range in
            listeners?.current?.guardedWrite(GuardedWrite(range: range, source: .host), context: nil)
        }
    }

    /// Sets (or with `nil` removes) the listener told about writes into guarded
    /// pages and about emulation failures while pages are guarded. May be
    /// called at any time.
    public func setPageGuardListener(_ listener: (any PageGuardListener)?) {
        guardListeners.set(listener)
    }

    /// Sets (or with `nil` removes) what tells which bytes an instruction KVM
    /// could not emulate writes; with one set, only emulation failures that
    /// touch a guarded page (or cannot be resolved) reach the listener.
    public func setEmulationFailureResolver(_ resolver: (any EmulationFailureResolver)?) {
        guardListeners.set(resolver: resolver)
    }

    /// A VM dropped without ``wait()`` after it stopped: its threads each held
    /// it until they finished, so all have, and are reclaimed here (this may
    /// run on the last of them); the fds, mappings and guest RAM go with the
    /// VM's members. A VM that still runs is not dropped: its threads hold it
    /// until it stops. Stop hooks and ``ExitHandler/vmDidStop(_:)`` run only in ``wait()``.
    deinit {
        var threads = control.takeThreads()
        if let t = timerThread { threads.append(t) }
        threads += serviceThreads.map(\.thread)
        for t in threads { t.joinOrDetach() }
    }

    /// Adds an exit handler. Handlers see exits in the order they were added,
    /// before the built-in ones (bus dispatch, then the default policy). Call before ``run()``.
    public func addExitHandler(_ handler: any ExitHandler) {
        handlers.append(handler)
    }

    /// Registers a coalesced zone (before ``start()``): the guest's writes there are batched by the
    /// kernel instead of exiting, and applied to the bus, in order, before the
    /// next exit of the vCPU that reads the ring is handled (and at stop).
    /// The corresponding ioctl is `KVM_REGISTER_COALESCED_MMIO`.
    public func registerCoalescedZone(_ zone: CoalescedZone) throws(VMError) {
        guard !isRunning else { throw .invalidState("register coalesced zones before starting the VM") }
        // The bus first: it checks the range, and a mark left by a failed registration only refuses fast paths.
        try markKernelHandled(zone.isPIO, zone.address, UInt64(zone.size), .coalescedZone)
        do { try backend.registerCoalescedZone(zone) } catch { throw .backend(error) }
        hasCoalescedZones = true
    }

    /// Registers an ioeventfd: the guest's writes to `event.address` signal
    /// the eventfd in the kernel instead of exiting. The bus learns of it and
    /// grants no fast path there. The corresponding ioctl is `KVM_IOEVENTFD`.
    public func registerIOEventFD(_ event: IOEventFD) throws(VMError) {
        try markKernelHandled(event.isPIO, event.address, UInt64(max(event.length, 1)), .ioeventfd)
        do { try backend.registerIOEventFD(event) } catch { throw .backend(error) }
    }

    private func markKernelHandled(_ isPIO: Bool, _ address: UInt64, _ size: UInt64, _ kind: KernelHandledKind) throws(VMError) {
        do {
            try bus.markKernelHandled(space: isPIO ? .pio : .mmio, range: GuestRange(start: GuestAddress(address), size: size), kind: kind)
        } catch { throw .bus(error) }
    }

    /// Applies writes batched in coalesced zones to the bus.
    func drainCoalesced(_ vcpu: any VCPUBackend) {
        // The ring is shared by all vCPUs: one drainer at a time.
        coalescedLock.lock()
        vcpu.drainCoalescedWrites { w in _ = bus.write(w.space, address: w.address, size: w.size, value: w.value) }
        coalescedLock.unlock()
    }

    private let coalescedLock = ConditionLock()

    private(set) var hasCoalescedZones = false

    /// Adds work run every `nanoseconds` on the VM's timer thread while the VM
    /// runs (for example draining a shared-memory ring while the vCPUs do not
    /// exit). Returning a ``StopReason`` stops the VM with it; throwing stops
    /// it with the error. Call before ``run()``.
    public func addPeriodicTask(every nanoseconds: UInt64, _ body: @escaping @Sendable (VirtualMachine) throws(VMError) -> StopReason?) {
        periodicTasks.append((max(nanoseconds, 100_000), body))
    }

    /// Adds a thread that runs `run` beside the vCPUs each time the VM starts
    /// (the polling ring consumer). `prepare` runs in ``start()`` before any
    /// vCPU thread does (the poller raises its flag there, so the guest's first
    /// entries already see it). `run` returns soon once ``isStopping`` or
    /// its ``ServiceStop`` is set; ``wait()`` sets the latter (then calls
    /// `wake`) after every vCPU has finished, and joins the thread before the
    /// handlers' ``ExitHandler/vmDidStop(_:)`` and the stop hooks run. Call before ``start()``.
    func addServiceThread(prepare: @escaping @Sendable () -> Void, run: @escaping @Sendable (VirtualMachine, ServiceStop) -> Void,
                          wake: @escaping @Sendable () -> Void) {
        services.append((prepare, run, wake))
    }

    /// The host CPUs the calling thread may run on (its affinity mask), in ascending order; empty when the
    /// host does not say. Threads the VM
    /// starts from this thread inherit it: before giving them a real-time policy, check that there are at
    /// least as many as busy threads (vCPUs and the ring poller; see "Devices on the bus" in WritingAVMM.md).
    public static var allowedHostCPUs: [Int] { HostCPUAffinity.current() }

    /// Whether a stop was requested or a vCPU stopped the VM (service threads poll this; lock-free).
    var isStopping: Bool { control.stopRequested }

    /// Whether any vCPU may still run (false once every vCPU has finished,
    /// halted ones included). Takes the control lock: poll it sparingly.
    var hasRunningVCPUs: Bool { control.hasActiveVCPUs }

    /// Whether a pause is requested or in force (service threads leave the devices alone then; lock-free).
    var isPauseRequested: Bool { control.requests.load(ordering: .acquiring) & Control.pauseBit != 0 }

    /// Stops the VM from a service thread: the first result wins.
    func finishFromService(_ result: Result<StopReason, VMError>) {
        control.finishExternally(result)
        kickAll()
    }

    /// Adds a closure run once each time the VM stops, after all vCPUs left `KVM_RUN`.
    public func addStopHook(_ hook: @escaping @Sendable (VirtualMachine) -> Void) {
        stopHooks.append(hook)
    }

    /// Runs every vCPU on its own thread until the VM stops, and returns why.
    ///
    /// - Throws: ``VMError`` for guest faults (with registers), unhandled
    ///   exits, strict-mode unclaimed accesses and backend failures.
    public func run() throws(VMError) -> StopReason {
        try start()
        return try wait()
    }

    /// Whether the VM has been started and not yet waited for.
    public var isRunning: Bool { control.isRunning }

    /// Starts the vCPU threads and returns at once; ``wait()`` for the result.
    public func start() throws(VMError) {
        // Threads inherit the affinity of the thread that creates them: this one, pinned while it does.
        var restoreAffinity: [Int]?
        if let cpus = configuration.hostCPUs {
            let previous = HostCPUAffinity.current()
            do { try HostCPUAffinity.set(cpus) } catch {
                throw VMError.invalidConfiguration("host CPUs \(cpus): \(error)")
            }
            restoreAffinity = previous
        }
        defer { if let r = restoreAffinity, !r.isEmpty { try? HostCPUAffinity.set(r) } }
        // Slot changes and the start exclude each other: a change made while not
        // running must not overlap vCPUs entering the guest.
        guard slots.withLayoutLocked({ control.begin(vcpuCount: vcpus.count) }) else {
            throw .invalidState("the VM is already running")
        }
        for s in services { s.prepare() }
        let guards = PageGuardHandler(memory: memory, slots: slots, listeners: guardListeners, vcpuCount: vcpus.count)
        let chain = [guards] + handlers + [BusDispatchHandler(strict: configuration.strict), DefaultExitPolicy()]
        var threads: [OSThread] = []
        for v in vcpus {
            let ctx = ExitContext(vcpuID: v.id, vm: self, backend: v.backend, handlers: chain,
                                  collectSites: configuration.collectSiteStatistics)
            v.context = ctx
            do {
                threads.append(try OSThread.start { [self] in
                    let outcome = v.runLoop(vm: self)
                    v.backend.unbindThread()
                    self.control.vcpuFinished(outcome)
                    if case .halted = outcome {} else { self.kickAll() }
                })
            } catch {
                control.vcpuFinished(.error(.backend(error)))
                kickAll()
            }
        }
        control.setThreads(threads)
        if !periodicTasks.isEmpty {
            do { try startTimer() } catch {
                control.finishExternally(.failure(.backend(error)))
                kickAll()
            }
        }
        for s in services {
            let stop = ServiceStop()
            do { serviceThreads.append((try OSThread.start { [self] in s.run(self, stop) }, stop, s.wake)) } catch {
                control.finishExternally(.failure(.backend(error)))
                kickAll()
            }
        }
    }

    private func startTimer() throws(BackendError) {
        let tasks = periodicTasks
        let tick = tasks.map(\.interval).min() ?? 10_000_000
        timerThread = try OSThread.start { [self] in
            var due = tasks.map { Sys.monotonicNanoseconds() &+ $0.interval }
            while control.sleepWhileRunning(nanoseconds: tick) {
                if control.isPaused { continue } // a pause holder owns the devices' state
                let now = Sys.monotonicNanoseconds()
                for (i, t) in tasks.enumerated() where now >= due[i] {
                    due[i] = now &+ t.interval
                    do throws(VMError) {
                        if let reason = try t.body(self) {
                            control.finishExternally(.success(reason))
                            kickAll()
                            return
                        }
                    } catch {
                        control.finishExternally(.failure(error))
                        kickAll()
                        return
                    }
                }
            }
        }
    }

    /// Waits until the VM has stopped, runs the stop hooks and handlers'
    /// ``ExitHandler/vmDidStop(_:)``, and returns why it stopped.
    ///
    /// - Throws: ``VMError/invalidState(_:)`` when the VM was not started, or
    ///   when called from an exit handler (it would wait for its own vCPU:
    ///   return ``ExitResult/stopVM(_:)`` or call ``stop()`` there instead).
    public func wait() throws(VMError) -> StopReason {
        guard !Sys.threadRunsVCPU(of: self) else {
            throw .invalidState("wait() from an exit handler would wait for its own vCPU; return .stopVM or call stop() instead")
        }
        guard control.isRunning else { throw .invalidState("the VM was not started") }
        let outcome = control.waitForAll()
        timerThread?.join()
        timerThread = nil
        for t in serviceThreads { t.stop.request(); t.wake() }
        for t in serviceThreads { t.thread.join() }
        serviceThreads = []
        if hasCoalescedZones, let v = vcpus.first { drainCoalesced(v.backend) }
        var result = outcome
        for h in handlers {
            do { try h.vmDidStop(self) } catch {
                if case .success = result { result = .failure(error) }
            }
        }
        for hook in stopHooks { hook(self) }
        control.reset()
        return try result.get()
    }

    /// Asks the VM to stop; returns at once. ``run()`` then returns ``StopReason/stopped``.
    public func stop() {
        control.requestStop()
        kickAll()
    }

    /// Pauses every vCPU and returns only when each is out of `KVM_RUN` with
    /// its pending access completed (or has already finished).
    ///
    /// May be called from any thread, including a vCPU's own thread from an
    /// exit handler (that vCPU counts as paused while its handler runs, but
    /// its own access completes only after the handler returns); not from a
    /// device holding its own lock (other vCPUs may be waiting for it). One thread holds the pause at a time; others wait their
    /// turn. Pauses nest: each `pauseAll()` that returned `true` needs one
    /// ``resumeAll()``.
    ///
    /// - Returns: `false` when the VM is not running or stopped while pausing
    ///   (then nothing is paused and no ``resumeAll()`` is due).
    @discardableResult
    public func pauseAll() -> Bool {
        control.acquirePause(selfIsVCPU: Sys.threadRunsVCPU(of: self)) { kickAll() }
    }

    /// Resumes the vCPUs once every ``pauseAll()`` has been matched. Only the
    /// thread that holds the pause can resume it; a call from any other thread
    /// does nothing (the holder's work, a slot change for example, must not
    /// see the vCPUs running).
    public func resumeAll() {
        control.resume()
    }

    /// The exit statistics of all vCPUs, merged. Call it while the VM is stopped
    /// or paused (``pauseAll()``): the vCPU threads update their counts without locks.
    public func statistics() -> ExitStatistics {
        var total = ExitStatistics(collectSites: configuration.collectSiteStatistics)
        for v in vcpus { if let c = v.context { total.merge(c.statistics) } }
        return total
    }

    private func kickAll() {
        for v in vcpus { v.backend.kick() }
    }
}

extension VirtualMachine: MemorySlotGate {
    package var vcpusMayRun: Bool { control.hasActiveVCPUs }
    package func pauseForSlotChange() -> Bool { pauseAll() }
    package func resumeAfterSlotChange() { resumeAll() }
}

/// Tells a service thread (``VirtualMachine/addServiceThread(run:wake:)``) to return.
final class ServiceStop: Sendable {
    private let flag = Atomic<Bool>(false)
    /// Whether the thread should return.
    var requested: Bool { flag.load(ordering: .acquiring) }
    /// Asks the thread to return.
    func request() { flag.store(true, ordering: .releasing) }
}

extension VirtualMachine {
    /// Executes a serializing instruction on the calling thread's CPU. A thread
    /// that rewrote guest code calls it before its own vCPU re-enters the guest;
    /// paused vCPUs serialize on their own when they resume (cross-modifying code).
    package static func serializeCallingThread() { Sys.serialize() }
}
