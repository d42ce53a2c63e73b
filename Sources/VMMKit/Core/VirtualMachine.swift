import Synchronization

/// How to build a ``VirtualMachine``.
public struct VMConfiguration: Sendable {
    /// Guest RAM size in bytes, mapped at guest-physical 0 (page aligned, at least 2 MiB).
    public var memorySize: UInt64 = 256 << 20
    /// The number of vCPUs.
    public var vcpuCount: Int = 1
    /// Extra memory regions: guest-physical range and whether the slot is read-only
    /// (guest writes to a read-only slot exit as MMIO writes).
    public var extraRegions: [(range: GuestRange, readOnly: Bool)] = []
    /// Stop the VM with ``VMError/unclaimedAccess(space:address:direction:vcpu:rip:)`` when the
    /// guest accesses a port or address no device claims (default: PC convention, reads all ones).
    public var strict: Bool = false
    /// Count exits per site (RIP and access), for profiles. Costs a hash-table update per exit.
    public var collectSiteStatistics: Bool = false

    /// The default configuration: 256 MiB, one vCPU.
    public init() {}

    /// A configuration with the given memory size and vCPU count.
    public init(memorySize: UInt64, vcpuCount: Int = 1) {
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
    }
}

/// A virtual machine: guest memory, vCPUs (one thread each), an I/O bus and
/// the exit chain.
///
/// ```swift
/// let vm = try VirtualMachine(backend: KVMSystem(), configuration: .init(memorySize: 64 << 20))
/// try vm.bus.attach(UART8250(sink: .standardOutput), ports: 0x3f8..<0x400)
/// let image = try BootLoader.load(elf: bytes, into: vm)
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

    private var handlers: [any ExitHandler] = []
    private var stopHooks: [(VirtualMachine) -> Void] = []
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
        var layout: [(GuestRange, Bool)] = [(GuestRange(start: GuestAddress(0), size: configuration.memorySize), false)]
        layout += configuration.extraRegions.map { ($0.range, $0.readOnly) }
        do {
            self.memory = try GuestMemory(ranges: layout)
        } catch { throw .memory(error) }
        do {
            for (i, r) in memory.regions.enumerated() {
                try backend.setUserMemoryRegion(MemorySlot(slot: UInt32(i), flags: r.readOnly ? .readOnly : [], range: r.range, host: r.host))
            }
            // Intel VMX needs three pages for a real-mode TSS; put them just below 4 GiB, out of RAM.
            try? backend.setTSSAddress(0xfffb_d000)
            for i in 0..<configuration.vcpuCount {
                vcpus.append(VCPU(id: i, backend: try backend.createVCPU(id: i)))
            }
        } catch { throw .backend(error) }
    }

    /// Adds an exit handler. Handlers see exits in the order they were added,
    /// before the built-in ones (bus dispatch, then the default policy). Call before ``run()``.
    public func addExitHandler(_ handler: any ExitHandler) {
        handlers.append(handler)
    }

    /// Adds a closure run once each time the VM stops, after all vCPUs left `KVM_RUN`.
    public func addStopHook(_ hook: @escaping (VirtualMachine) -> Void) {
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

    /// Starts the vCPU threads and returns at once; ``wait()`` for the result.
    public func start() throws(VMError) {
        guard control.begin(vcpuCount: vcpus.count) else { throw .invalidState("the VM is already running") }
        let chain = handlers + [BusDispatchHandler(strict: configuration.strict), DefaultExitPolicy()]
        var threads: [OSThread] = []
        for v in vcpus {
            let ctx = ExitContext(vcpuID: v.id, vm: self, backend: v.backend, handlers: chain,
                                  collectSites: configuration.collectSiteStatistics)
            v.context = ctx
            do {
                threads.append(try OSThread.start(name: "vcpu\(v.id)") { [self] in
                    let outcome = v.runLoop(vm: self)
                    self.control.vcpuFinished(outcome)
                    self.kickAll()
                })
            } catch {
                control.vcpuFinished(.error(.backend(error)))
                kickAll()
            }
        }
        control.setThreads(threads)
    }

    /// Waits until the VM has stopped, runs the stop hooks and handlers'
    /// ``ExitHandler/vmDidStop(_:)``, and returns why it stopped.
    public func wait() throws(VMError) -> StopReason {
        let outcome = control.waitForAll()
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
    /// its pending access completed (or has already finished). A no-op when not running.
    public func pauseAll() {
        guard control.requestPause() else { return }
        kickAll()
        control.waitForPaused()
    }

    /// Resumes the vCPUs paused by ``pauseAll()``.
    public func resumeAll() {
        control.resume()
    }

    /// The exit statistics of all vCPUs, merged. Exact when the VM is stopped or paused.
    public func statistics() -> ExitStatistics {
        var total = ExitStatistics(collectSites: configuration.collectSiteStatistics)
        for v in vcpus { if let c = v.context { total.merge(c.statistics) } }
        return total
    }

    private func kickAll() {
        for v in vcpus { v.backend.kick() }
    }
}

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
    private var pauseRequested = false
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

    func reset() { cond.withLock { running = false; pauseRequested = false; threads = [] } }

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

    func requestPause() -> Bool {
        cond.withLock {
            guard running, active > 0 else { return false }
            pauseRequested = true
            requests.bitwiseOr(Control.pauseBit, ordering: .sequentiallyConsistent)
            return true
        }
    }

    func waitForPaused() {
        cond.lock()
        while paused < active && !stopRequested { cond.wait(timeoutNanoseconds: 100_000_000) }
        cond.unlock()
    }

    func resume() {
        cond.withLock {
            pauseRequested = false
            requests.bitwiseAnd(~Control.pauseBit, ordering: .sequentiallyConsistent)
            cond.broadcast()
        }
    }

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
