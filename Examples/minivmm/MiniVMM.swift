import ArgumentParser
import DMP
import Logging
import VMMKit
import X86Disassembler

@main
struct MiniVMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "minivmm",
        abstract: "A minimal VMM built with VMMKit: runs a guest image on KVM.",
        subcommands: [Run.self, Bench.self, GuardBench.self, ExitPathBench.self, DetectorBench.self, DMPLatencyBench.self],
        defaultSubcommand: Run.self)
}

/// Options shared by `run` and `bench`.
struct GuestOptions: ParsableArguments {
    @Option(help: "Guest image: ELF64 (PVH note honoured) or flat binary. Default: the bundled demo guest.")
    var kernel: String?

    @Option(help: "Guest command line.")
    var append: String = ""

    @Option(help: "Guest memory, e.g. 256M, 1G (minimum 32M).")
    var memory: String = "256M"

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Flag(help: "Stop with an error when the guest touches a port or address no device claims.")
    var strict = false

    @Flag(inversion: .prefixedNo, help: "Consume the paravirtual rings with a polling thread while the guest runs.")
    var ringPoll = true

    @Option(help: "Microseconds the ring poller keeps polling without entries before it sleeps.")
    var ringPollIdle: UInt64 = 2000

    @Option(help: "Spin-wait hints between two looks of the ring poller at the rings (latency against cache traffic).")
    var ringPollSpins: Int = 16

    @Option(help: "Run the VM's threads (vCPUs, ring poller, timer) under SCHED_FIFO at this priority (1-99), so other busy host threads cannot take their CPUs (a ring producer falls back to exits while the poller is off its CPU). Taken only with a host CPU per vCPU and one for the poller.")
    var realtimePriority: Int32?

    @Option(help: "Slots per paravirtual ring (a power of two, 2-32768; above 512 the doorbell's ring moves past where the static-PV guests look for it).")
    var ringSlots: UInt32 = 512

    var ringPolling: PVRingPolling {
        guard ringPoll else { return .disabled }
        return .enabled(idleNanoseconds: ringPollIdle > UInt64.max / 1000 ? UInt64.max : ringPollIdle * 1000,
                        spinsBetweenChecks: min(max(ringPollSpins, 1), 1 << 20))
    }

    func memoryBytes() throws -> UInt64 {
        guard let v = parseSize(memory) else { throw ValidationError("bad --memory '\(memory)': use e.g. 256M or 1G") }
        return v
    }

    /// Bad `--memory`/`--cpus` values are usage errors (exit 64, with the usage), like every other.
    func validate() throws {
        let bytes = try memoryBytes()
        guard bytes >= X86Layout.minimumMemory, bytes <= 1 << 40, bytes % 4096 == 0 else {
            throw ValidationError("bad --memory '\(memory)': use a multiple of 4K from 32M to 1T, e.g. 256M or 1G")
        }
        guard (1...256).contains(cpus) else { throw ValidationError("bad --cpus \(cpus): use 1 to 256") }
        if let p = realtimePriority, !(1...99).contains(p) { throw ValidationError("bad --realtime-priority \(p): use 1 to 99") }
        try validateRingSlots(ringSlots)
    }

    func image() throws -> (BootImage, String) {
        guard let path = kernel else { return (.elf(demoGuestImage), "demo guest (hello)") }
        let bytes = try readFile(path)
        if bytes.starts(with: [0x7f, 0x45, 0x4c, 0x46]) { return (.elf(bytes), path) }
        return (.flat(bytes), path)
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a guest until it exits.")

    @OptionGroup var guest: GuestOptions

    @Flag(help: "Print an exit profile (counts per exit kind and the top exit sites) to stderr.")
    var profile = false

    @Flag(help: "Exit with QEMU's isa-debug-exit status (v << 1) | 1 instead of v.")
    var qemuExitStatus = false

    @OptionGroup var dmp: DMPOptions

    func run() throws {
        let session: Session
        do {
            session = try Session(options: guest, profile: profile, dmp: dmp.configuration())
        } catch {
            printError("minivmm: \(error)")
            throw ExitCode(125)
        }
        let interrupted = stopOnInterrupt(session.vm)
        let reason: StopReason
        do {
            reason = try session.vm.run()
        } catch {
            session.console.flush()
            printError("minivmm: \(error)")
            if profile { session.printProfile() }
            session.printDMPReport()
            throw ExitCode(125)
        }
        if profile { session.printProfile() }
        session.printDMPReport()
        switch reason {
        case .guestExit(let v):
            let code = qemuExitStatus ? Int32(truncatingIfNeeded: (v << 1) | 1) : Int32(truncatingIfNeeded: v)
            throw ExitCode(code & 0xff)
        case .stopped:
            throw ExitCode(interrupted.raised ? 130 : 0)
        case .halted:
            throw ExitCode(0)
        case .systemEvent(let t):
            printError("minivmm: guest system event \(t)")
            throw ExitCode(0)
        }
    }
}

/// Refuses a `--ring-slots` value ``StandardDevices`` cannot lay out.
func validateRingSlots(_ slots: UInt32) throws {
    guard slots >= 2, slots <= StandardDevices.maximumRingSlotCount, slots & (slots - 1) == 0 else {
        throw ValidationError("bad --ring-slots \(slots): use a power of two from 2 to \(StandardDevices.maximumRingSlotCount)")
    }
}

/// A configured VM with the standard devices and a loaded guest.
struct Session {
    let vm: VirtualMachine
    let devices: StandardDevices
    let console: OutputSink
    let loaded: LoadedImage
    /// The registers at each site's first exit, for matching instructions by operands (profile only).
    let snapshots: ExitSnapshots?
    /// DMP, when `--dmp` or `--dmp-dry-run` turned it on.
    let dmp: DMPMiddleware?

    init(options: GuestOptions, profile: Bool, dmp: DMPConfiguration? = nil, console: OutputSink = .standardOutput()) throws {
        if let p = options.realtimePriority,
           let refused = becomeRealtime(priority: p, busyThreads: options.cpus + (options.ringPoll ? 1 : 0)) {
            printError("minivmm: --realtime-priority \(p) not taken: \(refused)")
        }
        var config = VMConfiguration(memorySize: try options.memoryBytes(), vcpuCount: options.cpus)
        config.strict = options.strict
        config.collectSiteStatistics = profile
        let kvm = try KVMSystem()
        vm = try VirtualMachine(backend: kvm, configuration: config)
        self.console = console
        // First in the chain, so it sees exits the devices' own handlers consume.
        snapshots = profile ? ExitSnapshots() : nil
        if let snapshots { vm.addExitHandler(snapshots) }
        devices = try StandardDevices.install(on: vm, console: console, ringPolling: options.ringPolling,
                                              ringSlotCount: options.ringSlots)
        let (image, _) = try options.image()
        loaded = try X86Boot.load(image, commandLine: options.append, into: vm)
        if var c = dmp {
            c.use(loaded)
            var logger = Logger(label: "minivmm.dmp")
            logger.logLevel = DMPOptions.logLevel
            self.dmp = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
        } else {
            self.dmp = nil
        }
    }

    /// Prints DMP's report on stderr (when DMP is on).
    func printDMPReport() {
        guard let dmp else { return }
        printError(DMPReport.text(dmp.report(), latencies: dmp.hotToPatchedNanoseconds))
    }

    func printProfile() {
        let stats = vm.statistics()
        var out = "\n== exit profile ==\n"
        out += pad("kind", 16) + pad("count", 12, right: true) + "\n"
        for k in ExitKind.allCases where stats[k] > 0 {
            out += pad(k.description, 16) + pad(String(stats[k]), 12, right: true) + "\n"
        }
        out += pad("total", 16) + pad(String(stats.total), 12, right: true) + "\n"
        if let steady = devices.marker.steadyPhase {
            out += "steady phase: \(steady.exits) exits in \(steady.nanoseconds / 1_000_000) ms\n"
        }
        let ring = RingCounters(devices.rings)
        if ring.fallbacks + ring.kicks > 0 {
            out += "rings: \(ring.fallbacks) producer fallbacks (\(ring.ringFull) ring full, \(ring.consumerIdle) consumer idle), "
            out += "\(ring.kicks) kicks, poller slept \(ring.pollerSleeps) times\n"
        }
        let top = stats.topSites(10)
        if !top.isEmpty {
            out += "\n== top exit sites (rip is where KVM reported it; the instruction is the one that exited) ==\n"
            out += pad("rip", 20) + pad("symbol", 24) + pad("instruction", 40) + pad("access", 22) + pad("count", 10, right: true) + "\n"
            let profiler = SiteDescriber(vm: vm, snapshots: snapshots, symbols: loaded.symbols)
            // A site DMP patched no longer holds its instruction (the patch's jump does): DMP knows which it was.
            var patched: [ExitSite: String] = [:]
            for p in dmp?.report() ?? [] { patched[p.site] = p.instruction + " (DMP)" }
            for (site, count) in top {
                out += pad("0x" + String(site.rip, radix: 16), 20)
                out += pad(loaded.symbols.symbolize(site.rip) ?? "-", 24)
                out += pad(profiler.instruction(for: site) ?? patched[site] ?? "?", 40)
                out += pad(describe(site), 22)
                out += pad(String(count), 10, right: true) + "\n"
            }
        }
        let unclaimed = vm.bus.unclaimedCounts
        if !unclaimed.isEmpty {
            out += "\n== unclaimed accesses ==\n"
            for (a, n) in unclaimed.sorted(by: { $0.value > $1.value }).prefix(10) {
                out += "\(a.space) \(a.direction) 0x\(String(a.address, radix: 16)): \(n)\n"
            }
        }
        printError(out)
    }

    private func describe(_ s: ExitSite) -> String {
        let dir = s.direction == .write ? "write" : "read"
        switch s.kind {
        case .io: return "port 0x\(String(s.address, radix: 16)) \(dir)\(s.size)"
        case .mmio: return "mmio 0x\(String(s.address, radix: 16)) \(dir)\(s.size)"
        case .msr: return "msr 0x\(String(s.address, radix: 16)) \(dir)"
        default: return s.kind.description
        }
    }
}

/// `--dmp` and its options.
struct DMPOptions: ParsableArguments {
    @Flag(help: "Turn DMP on: patch the guest's hot device accesses into implanted fast paths; print DMP's report on stderr at exit. Enables user-mode fast paths (minivmm runs trusted guests).")
    var dmp = false

    @Flag(help: "Report what DMP would patch; change no guest byte.")
    var dmpDryRun = false

    @Option(help: "Exits a site must cause within the window to become hot.")
    var dmpThreshold: Int = 64

    /// The log level of DMP's decisions on stderr (`MINIVMM_DMP_LOG=info` shows every decision).
    static var logLevel: Logger.Level {
        if let v = environment("MINIVMM_DMP_LOG"), let l = Logger.Level(rawValue: v) { return l }
        return .warning
    }

    /// Whether implanted bodies count with locked instructions (`MINIVMM_DMP_LOCKED_COUNTERS=1` or `0`; unset:
    /// the library's choice, locked with more than one vCPU), for measuring what locked counters cost.
    static var lockedCounters: Bool? {
        switch environment("MINIVMM_DMP_LOCKED_COUNTERS") {
        case "1": true
        case "0": false
        default: nil
        }
    }

    func validate() throws {
        guard (1...1_000_000).contains(dmpThreshold) else { throw ValidationError("bad --dmp-threshold \(dmpThreshold): use 1 to 1000000") }
    }

    /// swift-log's handler for the process: DMP's decisions go to stderr, beside minivmm's own messages.
    private static let bootstrapLogging: Void = LoggingSystem.bootstrap(StreamLogHandler.standardError)

    /// The configuration, or nil when DMP is off.
    func configuration() -> DMPConfiguration? {
        guard dmp || dmpDryRun else { return nil }
        DMPOptions.bootstrapLogging
        var c = DMPConfiguration()
        c.threshold = dmpThreshold
        c.dryRun = dmpDryRun
        c.userModeFastPaths = true
        c.lockedCounters = DMPOptions.lockedCounters
        printError("minivmm: DMP on\(dmpDryRun ? " (dry run: no guest byte changes)" : ""); user-mode fast paths enabled (they bypass the guest's I/O permission checks)")
        return c
    }
}

func pad(_ s: String, _ n: Int, right: Bool = false) -> String {
    // A left-aligned value that fills its column still gets one space before the next one.
    let p = String(repeating: " ", count: max(right ? 0 : 1, n - s.count))
    return right ? p + s + " " : s + p
}

