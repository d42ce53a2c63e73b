import DMP
import Logging
import Synchronization
import Testing
import VMMKit

/// One guest run with DMP on (or off), through the library's public API as a VMM would use it.
struct DMPLibraryRun {
    let text: String
    let stop: StopReason
    let report: [PatchSite]
    let steadyExits: Int?
    let latencies: [PatchLatency]
    /// How many times the ring poller went to sleep after an idle period.
    let pollerSleeps: Int
    /// Producer fallbacks counted over every ring (``PVRingStatistics/fallbacks``).
    let ringFallbacks: Int
    /// Of ``steadyExits``, the kicks of the ring poller (``SteadyPhaseKicks``).
    let steadyKicks: Int

    /// `prepare`: runs on the new VM before anything is installed (exit handlers of a test, first in the chain).
    /// `hostCPUs`: pins the VM's threads (vCPUs, ring poller, timer) to these host CPUs.
    /// `pollerIdle`: how long the ring poller polls without entries before it sleeps, in ns (nil: the default, 2 ms).
    /// `ringPolling`: the rings' consumer, in place of `pollerIdle`'s (`.disabled`: no thread polls them).
    /// `around`: wraps the run, with the devices and DMP installed (a test's own thread beside the guest).
    init(_ image: String, commandLine: String, dmp: Bool = true, cpus: Int = 1, hostCPUs: [Int]? = nil,
         pollerIdle: UInt64? = nil, ringPolling: PVRingPolling? = nil,
         configure: (inout DMPConfiguration) -> Void = { _ in },
         prepare: (VirtualMachine) throws -> Void = { _ in },
         around: (VirtualMachine, StandardDevices, DMPMiddleware?, () throws -> StopReason) throws -> StopReason = { try $3() }) throws {
        var vmConfiguration = VMConfiguration(memorySize: 64 << 20, vcpuCount: cpus)
        vmConfiguration.hostCPUs = hostCPUs
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: vmConfiguration)
        let kicks = SteadyPhaseKicks()
        vm.addExitHandler(kicks)
        try prepare(vm)
        let console = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: console.sink(),
                                                  ringPolling: ringPolling ?? pollerIdle.map { .enabled(idleNanoseconds: $0) } ?? .enabled())
        let loaded = try X86Boot.load(.elf(try guestImage(image)), commandLine: commandLine, into: vm)
        var middleware: DMPMiddleware?
        if dmp {
            var c = DMPConfiguration()
            c.use(loaded)
            c.userModeFastPaths = true
            configure(&c)
            var logger = Logger(label: "test.dmp")
            logger.logLevel = .critical
            middleware = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
        }
        stop = try around(vm, devices, middleware) { try vm.run() }
        text = console.text
        report = middleware?.report() ?? []
        steadyExits = devices.marker.steadyPhase?.exits
        steadyKicks = kicks.count
        latencies = middleware?.patchLatencies ?? []
        pollerSleeps = devices.rings.pollerSleeps
        ringFallbacks = devices.rings.targets.indices.reduce(0) { $0 + devices.rings.statistics(ring: $1).fallbacks }
    }

    func site(_ location: String) -> PatchSite? { report.first { $0.location == location } }

    /// The guest's lines without its RESULT line (whose cycle count varies from run to run).
    /// The output's lines but the RESULT line (its cycle count varies); `\r\n` ends a line too (one Character in Swift).
    var lines: [Substring] { text.split(whereSeparator: \.isNewline).filter { !$0.hasPrefix("RESULT") } }

    /// Expects this run (DMP on) to print what `off` printed, with the same checksum, and to keep fewer than
    /// 1/`factor` of `off`'s steady-phase exits. `kicksExcluded`: the bound counts the steady exits besides the
    /// poller's kicks (``steadyKicks``), for tests of what a plan serves whose synchronous appends kick whenever
    /// the host keeps the ring poller off its CPU longer than their bounded wait (each such append was served:
    /// its entry published, the kick only brings the consumer); an access left to exit at its original
    /// instruction still counts.
    func expectSameOutput(as off: DMPLibraryRun, steadyExitsCutBy factor: Int, kicksExcluded: Bool = false,
                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(lines == off.lines, sourceLocation: sourceLocation)
        #expect(resultField(text, "checksum") == resultField(off.text, "checksum"), sourceLocation: sourceLocation)
        let offExits = try #require(off.steadyExits, sourceLocation: sourceLocation)
        let onExits = try #require(steadyExits, sourceLocation: sourceLocation) - (kicksExcluded ? steadyKicks : 0)
        let kicks = kicksExcluded ? " besides \(steadyKicks) kicks" : ""
        #expect(onExits * factor < offExits, "steady exits \(onExits) with DMP\(kicks), \(offExits) without", sourceLocation: sourceLocation)
    }
}

/// Counts the ring poller's kicks (writes to ``StandardDevices/ringKickPort``) that the vCPU marking the steady
/// phase makes inside it (from its first mark 1 to the next mark 2, as ``PhaseMarker/steadyPhase`` counts): the
/// exits of served ring appends that found the poller asleep or whose bounded wait for it ran out. Passes every exit on.
final class SteadyPhaseKicks: ExitHandler, Sendable {
    private let state = Mutex<(vcpu: Int?, ended: Bool, kicks: Int)>((nil, false, 0))

    var exitKinds: Set<ExitKind>? { [.io] }

    /// The kicks counted.
    var count: Int { state.withLock { $0.kicks } }

    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        guard case .io(let io) = exit, io.direction == .write else { return .pass }
        if io.port == StandardDevices.markerPort {
            state.withLock { s in
                if io.value == 1, s.vcpu == nil { s.vcpu = context.vcpuID }
                if io.value == 2, s.vcpu != nil { s.ended = true }
            }
        } else if io.port == StandardDevices.ringKickPort {
            state.withLock { s in if s.vcpu == context.vcpuID && !s.ended { s.kicks += 1 } }
        }
        return .pass
    }
}

extension KVMTests {
    @Test("DMP on uart-cpl3: both uart_putc sites served by one function copy, output identical to DMP off, steady phase nearly exit-free")
    func dmpUartCPL3() throws {
        let off = try DMPLibraryRun("uart-cpl3", commandLine: "iters=400", dmp: false)
        let on = try DMPLibraryRun("uart-cpl3", commandLine: "iters=400")
        #expect(on.stop == off.stop)
        for location in ["uart_putc+0x5", "uart_putc+0x11"] {
            let s = try #require(on.site(location), "\(on.report)")
            #expect(s.state == .patched, "\(s)")
            #expect(s.strategy.hasPrefix("function copy of uart_putc"))
            #expect(s.hitsServed > 1000)
            #expect(s.userMode)
        }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20)
    }

    @Test("DMP on c-uart-cpl3 (gcc -O2, accessors through function pointers): every port site served, over 90% of the steady exits gone, same output")
    func dmpCUart() throws {
        let off = try DMPLibraryRun("c-uart-cpl3", commandLine: "iters=120", dmp: false)
        let on = try DMPLibraryRun("c-uart-cpl3", commandLine: "iters=120")
        #expect(on.stop == .guestExit(status: 0))
        let patched = on.report.filter { $0.state == .patched }
        #expect(Set(patched.map(\.site.address)) == [0x80, 0x3f8, 0x3fd], "\(on.report.map(\.description))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    /// c-poll-cpl3 (gcc -O2, the print loop written out in main, which never returns): entered through the
    /// enclosing loop. c-console-cpl3-Os (an early console's write function, reached only through a function
    /// pointer: 2-byte first instruction, no padding, loops of short instructions): entered at a port load
    /// before its loops, on its next call.
    @Test("DMP on loops of short instructions: entered by an instruction redirect (an enclosing loop, or before the loops), over 90% of the steady exits gone, same output", arguments: [
        ("c-poll-cpl3", "main+", "iters=300"), ("c-console-cpl3-Os", "early_console_write+", "iters=200"),
    ])
    func dmpCPoll(image: String, function: String, commandLine: String) throws {
        let off = try DMPLibraryRun(image, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(image, commandLine: commandLine)
        #expect(on.stop == .guestExit(status: 0))
        let sites = on.report.filter { $0.location.hasPrefix(function) }
        #expect(sites.count == 2 && sites.allSatisfy { $0.state == .patched && $0.hitsServed > 0 && $0.strategy.contains("instruction redirect") },
                "\(on.report.map(\.description))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    @Test("DMP on c-uart-cpl3 built at -O0: the one out-of-line outb serves both of its hot ports (THR and the 0x80 delay) from one rewrite, over 90% of the steady exits gone, same output")
    func dmpCUartO0() throws {
        let off = try DMPLibraryRun("c-uart-cpl3-O0", commandLine: "iters=120", dmp: false)
        let on = try DMPLibraryRun("c-uart-cpl3-O0", commandLine: "iters=120")
        #expect(on.stop == .guestExit(status: 0))
        let outb = on.report.filter { $0.location.hasPrefix("outb+") && $0.state == .patched && $0.hitsServed > 0 }
        #expect(Set(outb.map(\.site.address)) == [0x80, 0x3f8], "\(on.report.map(\.description))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    @Test("a copy that is never entered (c-poll-cpl3 with only its call-site and start entries, main never returns): undone as never entered, with back-off, same output")
    func dmpCopyNeverEntered() throws {
        let off = try DMPLibraryRun("c-poll-cpl3", commandLine: "iters=300", dmp: false)
        let on = try DMPLibraryRun("c-poll-cpl3", commandLine: "iters=300") {
            $0.copyEntryKinds = [.functionEntry, .entryThroughPadding, .callSite, .tailCallSite]
            $0.initialBackoff = 1 << 20
        }
        #expect(on.stop == .guestExit(status: 0))
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let inMain = on.report.filter { $0.location.hasPrefix("main+") }
        #expect(!inMain.isEmpty)
        for s in inMain {
            #expect(s.state == .undone && s.hitsServed == 0, "\(s)")
            #expect(s.refusal?.stage == .verify && s.refusal?.reason.contains("never entered") == true, "\(String(describing: s.refusal))")
        }
    }

    @Test("DMP at CPL0 (uart-cpl0, emulated here): the copy is measured and undone as slower, the output stays the same")
    func dmpUartCPL0Undone() throws {
        let off = try DMPLibraryRun("uart-cpl0", commandLine: "iters=300", dmp: false)
        let on = try DMPLibraryRun("uart-cpl0", commandLine: "iters=300")
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        let s = try #require(on.site("uart_putc+0x5"), "\(on.report)")
        // On hardware virtualization CPL0 runs natively and the copy may well pay; here it is emulated.
        try KVMTests.expectTrialJudged(s)
    }

    /// A CPL0 site was judged by its A/B trial: undone with the trial's figures (patched slower than the original
    /// code), or patched with them (not slower; then its windows may still have turned it off alone in its copy, or
    /// undone it whole, the trial's figures kept). Where the host's scheduling decides the outcome, any outcome of
    /// the trial is accepted: a trial phase switch that found the vCPU paused inside the bytes to write at
    /// ``DMPConfiguration/trialSwitchBusyPasses`` passes in a row undoes the patch with that reason (one that found it
    /// there fewer times is tried again and the trial goes on). Without trials a CPL0 patch stays with no figures.
    static func expectTrialJudged(_ s: PatchSite, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(s.state == .undone || s.state == .patched || s.state == .disabled, "\(s)", sourceLocation: sourceLocation)
        let paid = s.trialResult?.contains("accesses/s patched") == true
        if s.state == .disabled {
            #expect(paid && s.refusal?.reason.contains("turned off alone") == true, "\(s)", sourceLocation: sourceLocation)
        } else if s.state == .undone {
            let why = try #require(s.refusal, sourceLocation: sourceLocation)
            let lost = why.reason.contains("accesses/s patched against") && why.reason.contains("with the original code")
            let cutShort = why.reason.hasPrefix("an A/B trial could not switch the patch")
            #expect(why.stage == .verify && (lost || cutShort || paid), "\(why) \(s.trialResult ?? "no trial result")",
                    sourceLocation: sourceLocation)
        } else {
            #expect(s.hitsServed > 0 && s.trialResult?.contains("accesses/s patched") == true, "\(s)", sourceLocation: sourceLocation)
        }
    }

    @Test("DMP at CPL0 on C (c-uart-cpl0, gcc -O2): every patch judged by its A/B trial, the output the same; once the ring producers are undone the poller sleeps")
    func dmpCUartCPL0Trial() throws {
        let off = try DMPLibraryRun("c-uart-cpl0", commandLine: "iters=200", dmp: false)
        let on = try DMPLibraryRun("c-uart-cpl0", commandLine: "iters=200")
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum") && resultField(on.text, "checksum") == "0xb735dd4d")
        #expect(on.stop == off.stop)
        let served = on.report.filter { $0.location.hasPrefix("io_serial_") }
        #expect(served.count == 4, "\(on.report)")
        for s in served { try KVMTests.expectTrialJudged(s) }
        if on.report.allSatisfy({ $0.state != .patched }) {
            // With no ring producer left, the guest's own THR writes no longer keep the poller polling.
            #expect(on.pollerSleeps > 0)
        }
    }

    @Test("--dmp-dry-run: sites reported as would patch, nothing patched, same output")
    func dmpDryRun() throws {
        let off = try DMPLibraryRun("uart-cpl3", commandLine: "iters=60", dmp: false)
        let dry = try DMPLibraryRun("uart-cpl3", commandLine: "iters=60") { $0.dryRun = true }
        #expect(resultField(dry.text, "checksum") == resultField(off.text, "checksum"))
        #expect(!dry.report.isEmpty)
        #expect(dry.report.allSatisfy { $0.state == .wouldPatch && $0.hitsServed == 0 }, "\(dry.report)")
        #expect(dry.steadyExits == off.steadyExits)
    }

    @Test("plans refused before anything was written, and dry runs, give their implant code back: none stays claimed")
    func dmpRefusedPlansGiveCodeBack() throws {
        func claimed(_ configure: @escaping (inout DMPConfiguration) -> Void) throws -> (DMPLibraryRun, GuestRange?) {
            var pages: GuestRange?
            let run = try DMPLibraryRun("uart-cpl3", commandLine: "iters=60", configure: configure, around: { _, _, dmp, run in
                defer { pages = dmp?.testSeam.implantCodePages }
                return try run()
            })
            return (run, pages)
        }
        let (patched, patchedPages) = try claimed { _ in }
        #expect(patched.report.contains { $0.state == .patched })
        #expect((patchedPages?.size ?? 0) > 0, "a patch keeps its code")
        let (dry, dryPages) = try claimed { $0.dryRun = true }
        #expect(!dry.report.isEmpty && dry.report.allSatisfy { $0.state == .wouldPatch }, "\(dry.report)")
        #expect(dryPages?.size == 0, "a dry run writes no code and keeps none")
        // A function copy no entry reaches is refused after its code was allocated.
        let (refused, refusedPages) = try claimed { $0.strategies = .functionCopy; $0.copyEntryKinds = [] }
        #expect(!refused.report.isEmpty && refused.report.allSatisfy { $0.state == .refused }, "\(refused.report)")
        #expect(refused.report.contains { $0.refusal?.reason.contains("no entry into the copy") == true }, "\(refused.report)")
        #expect(refusedPages?.size == 0, "refused plans keep no code")
    }

    @Test("DMP with user-mode fast paths off refuses CPL3 sites with the reason")
    func dmpUserModeOff() throws {
        let on = try DMPLibraryRun("uart-cpl3", commandLine: "iters=60") { $0.userModeFastPaths = false }
        #expect(!on.report.isEmpty)
        for s in on.report {
            #expect(s.state == .refused)
            #expect(s.refusal?.reason.contains("user-mode fast paths are off") == true, "\(String(describing: s.refusal))")
        }
    }
}
