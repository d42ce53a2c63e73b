import ArgumentParser
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

    @Option(help: "Exits measured per run.")
    var exits: Int = 100_000

    @Flag(help: "Count exits per site too (the hotspot-detector load).")
    var sites = false

    func run() throws {
        let image = try readFile(guests + "/uart-cpl0.elf")
        let tscPerNs = calibrateTSC()
        var medians: [Double] = []
        print("exit path: KVM_RUN return -> next KVM_RUN, uart-cpl0 (THR writes, LSR reads), \(exits) exits per run, TSC \(fmt(tscPerNs)) GHz\(sites ? ", site statistics on" : "")")
        for i in 0..<max(1, runs) {
            var config = VMConfiguration(memorySize: 64 << 20)
            config.collectSiteStatistics = sites
            let vm = try VirtualMachine(backend: try KVMSystem(), configuration: config)
            try StandardDevices.install(on: vm, console: OutputSink { _ in })
            // About 76 exits per iteration; ask for enough that the probe fills.
            _ = try X86Boot.load(.elf(image), commandLine: "iters=\(exits / 60 + 10)", into: vm)
            guard let kvcpu = vm.vcpus[0].backend as? KVMVCPU else { throw ValidationError("not a KVM vCPU") }
            let probe = ExitPathProbe(capacity: exits)
            kvcpu.exitPathProbe = probe
            guard case .guestExit(0) = try vm.run() else { throw ValidationError("uart-cpl0 did not exit with 0") }
            let ns = probe.samples.map { Double($0) / tscPerNs }.sorted()
            guard !ns.isEmpty else { throw ValidationError("no samples") }
            func pct(_ p: Double) -> Double { ns[min(ns.count - 1, Int(Double(ns.count) * p))] }
            medians.append(pct(0.5))
            print("  run \(i + 1): \(ns.count) exits  p50 \(fmt(pct(0.5))) ns  p90 \(fmt(pct(0.9))) ns  p99 \(fmt(pct(0.99))) ns")
        }
        let m = medians.sorted()
        print("  medians over \(m.count) runs: \(fmt(m.first ?? 0))–\(fmt(m.last ?? 0)) ns (median of medians \(fmt(median(m))) ns)")
    }
}
