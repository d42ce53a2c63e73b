import ArgumentParser
import DMP
import Logging
import VMMKit

/// `minivmm exit-path`: the VMM's side of one exit, for a UART transmit write
/// and a line-status read (the uart-cpl0 workload's two exits): TSC cycles
/// from `KVM_RUN` returning to the next `KVM_RUN` call (decode, statistics,
/// the exit chain, the bus, the UART), per run and as a range over runs.
struct ExitPathBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exit-path",
        abstract: "Measure the VMM's exit path (KVM_RUN return to next KVM_RUN) on UART exits: p50/p90/p99 per run.")

    @Option(help: "Guest directory holding uart-cpl0.elf.")
    var guests: String = "Guests"

    @Option(help: "Runs (each a fresh VM).")
    var runs: Int = 5

    @Option(help: "Exits measured per run (1-10000000).")
    var exits: Int = 100_000

    @Flag(help: "Count exits per site too (the hotspot-detector load).")
    var sites = false

    @Flag(help: "Interleave runs with DMP installed (default detector, no patch strategy: each hot site is refused once, every other exit is not a candidate) and without: what DMP adds to an exit that is not a candidate.")
    var compareDmp = false

    /// Bounds the sizes: `--exits` sizes the probe's sample buffer (8 bytes each), which an unchecked count
    /// would overflow or exhaust.
    func validate() throws {
        guard (1...1000).contains(runs) else { throw ValidationError("--runs must be 1...1000") }
        guard (1...10_000_000).contains(exits) else { throw ValidationError("--exits must be 1...10000000") }
    }

    func run() throws {
        let image = try readFile(guests + "/uart-cpl0.elf")
        let tscPerNs = calibrateTSC()
        var medians: [Double] = []
        var dmpMedians: [Double] = []
        print("exit path: KVM_RUN return -> next KVM_RUN, uart-cpl0 (THR writes, LSR reads), \(exits) exits per run, TSC \(fmt(tscPerNs)) GHz\(sites ? ", site statistics on" : "")")
        for i in 0..<max(1, runs) {
            for withDMP in compareDmp ? [false, true] : [false] {
                let m = try measure(image, tscPerNs: tscPerNs, dmp: withDMP, label: "run \(i + 1)\(compareDmp ? (withDMP ? " dmp on " : " dmp off") : "")")
                if withDMP { dmpMedians.append(m) } else { medians.append(m) }
            }
        }
        let m = medians.sorted()
        print("  medians over \(m.count) runs: \(fmt(m.first ?? 0))–\(fmt(m.last ?? 0)) ns (median of medians \(fmt(median(m))) ns)")
        if compareDmp {
            let d = dmpMedians.sorted()
            let added = zip(medians, dmpMedians).map { $1 - $0 }.sorted()
            print("  with DMP (no candidate): \(fmt(d.first ?? 0))–\(fmt(d.last ?? 0)) ns (median of medians \(fmt(median(d))) ns)")
            print("  DMP adds per exit, run by run: \(fmt(added.first ?? 0))–\(fmt(added.last ?? 0)) ns (median \(fmt(median(added))) ns)")
        }
    }

    /// One run: the median exit-path time in ns (and its line printed).
    private func measure(_ image: [UInt8], tscPerNs: Double, dmp: Bool, label: String) throws -> Double {
        do {
            var config = VMConfiguration(memorySize: 64 << 20)
            config.collectSiteStatistics = sites
            let vm = try VirtualMachine(backend: try KVMSystem(), configuration: config)
            let devices = try StandardDevices.install(on: vm, console: OutputSink { _ in })
            // About 76 exits per iteration; ask for enough that the probe fills.
            let loaded = try X86Boot.load(.elf(image), commandLine: "iters=\(exits / 60 + 10)", into: vm)
            if dmp {
                var c = DMPConfiguration()
                c.use(loaded)
                c.strategies = []   // default detector; each hot site is refused once, every other exit is not a candidate
                var logger = Logger(label: "minivmm.exit-path.dmp")
                logger.logLevel = .critical
                DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
            }
            guard let kvcpu = vm.vcpus[0].backend as? KVMVCPU else { throw ValidationError("not a KVM vCPU") }
            let probe = ExitPathProbe(capacity: exits)
            kvcpu.exitPathProbe = probe
            guard case .guestExit(0) = try vm.run() else { throw ValidationError("uart-cpl0 did not exit with 0") }
            let ns = probe.samples.map { Double($0) / tscPerNs }.sorted()
            guard !ns.isEmpty else { throw ValidationError("no samples") }
            func pct(_ p: Double) -> Double { ns[min(ns.count - 1, Int(Double(ns.count) * p))] }
            print("  \(label): \(ns.count) exits  p50 \(fmt(pct(0.5))) ns  p90 \(fmt(pct(0.9))) ns  p99 \(fmt(pct(0.99))) ns")
            return pct(0.5)
        }
    }
}
