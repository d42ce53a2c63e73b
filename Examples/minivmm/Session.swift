import DMP
import Logging
import VMMKit
import X86Disassembler

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
        if let p = options.realtimePriority {
            printError(becomeRealtime(priority: p, busyThreads: options.cpus + (options.ringPoll ? 1 : 0)).message("minivmm"))
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
