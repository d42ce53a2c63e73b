import ArgumentParser
import DMP
import Logging
import VMMKit

/// `minivmm dmp-latency`: DMP's time from a site becoming hot until every vCPU
/// has resumed with its patch in place, with two vCPUs busy in the guest.
///
/// Each run is a fresh VM with `--cpus` vCPUs running `Guests/smp-cpl3.elf`:
/// the BSP and the AP both run CPL3 loops over their own port I/O sites
/// (LSR reads and port-0x80 writes, `--sites` per vCPU, `--iters` calls
/// each), so a patch always pauses a vCPU that is running guest code or
/// exiting at a site of its own, never one parked in `hlt`. DMP is on as
/// with `minivmm run --dmp` (user-mode fast paths enabled); every patch a run
/// applies (the sites of both vCPUs, and `uart_putc` when the RESULT line
/// gets hot) contributes its ``DMPMiddleware/hotToPatchedNanoseconds``. A
/// first run without DMP gives the reference checksums: every DMP run must
/// print the same ones, or the command fails. Prints p50/p90/max per run and
/// over all patches of all runs (`--json`: one JSON object on stdout).
struct DMPLatencyBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dmp-latency",
        abstract: "Measure DMP's hot-to-patched latency with two vCPUs busy at CPL3 (p50/p90/max over all patches of --runs runs).")

    @Option(help: "Runs with DMP (each a fresh VM).")
    var runs: Int = 5

    @Option(help: "The two-vCPU guest image.")
    var kernel: String = "Guests/smp-cpl3.elf"

    @Option(help: "Sites per vCPU (1-12): each becomes hot and is patched in turn.")
    var sites: Int = 12

    @Option(help: "Calls of each site per vCPU.")
    var iters: Int = 4096

    @Option(help: "Rounds of guest arithmetic (no exit) after each call: how long a vCPU runs in the guest once its site is patched.")
    var spin: Int = 1000

    @Option(help: "vCPUs (the guest uses two; more park in hlt).")
    var cpus: Int = 2

    @Option(help: "Exits a site must cause within DMP's window to become hot.")
    var threshold: Int = 64

    @Flag(help: "Print one JSON object on stdout (progress goes to stderr).")
    var json = false

    func validate() throws {
        guard (1...1000).contains(runs) else { throw ValidationError("--runs must be 1...1000") }
        guard (1...12).contains(sites) else { throw ValidationError("--sites must be 1...12") }
        guard (1...100_000_000).contains(iters) else { throw ValidationError("--iters must be 1...100000000") }
        guard (0...100_000_000).contains(spin) else { throw ValidationError("--spin must be 0...100000000") }
        guard (2...64).contains(cpus) else { throw ValidationError("--cpus must be 2...64") }
        guard (1...1_000_000).contains(threshold) else { throw ValidationError("--threshold must be 1...1000000") }
    }

    /// One run's outcome.
    struct Sample {
        var patches: [PatchLatency]
        var latencies: [UInt64] { patches.map(\.hotToPatchedNanoseconds) }
        var patchedSites: Int
        var checksums: String
        var wallNanoseconds: UInt64
    }

    func run() throws {
        let image = try readFile(kernel)
        let reference = try measure(image, dmp: false)
        var samples: [Sample] = []
        for i in 0..<runs {
            let s = try measure(image, dmp: true)
            guard s.checksums == reference.checksums else {
                throw ValidationError("run \(i + 1): checksums with DMP (\(s.checksums)) differ from the run without (\(reference.checksums))")
            }
            printError("dmp-latency: run \(i + 1)/\(runs): \(s.latencies.count) patches, p90 \(ms(percentile(s.latencies, 0.9))) ms")
            samples.append(s)
        }
        let all = samples.flatMap(\.latencies)
        let paused = samples.flatMap { $0.patches.map(\.pausedNanoseconds) }
        let deferred = samples.flatMap { $0.patches.map(\.deferredNanoseconds) }.filter { $0 > 0 }
        let runP90 = samples.map { percentile($0.latencies, 0.9) }
        if json {
            let perRun: [JSONValue] = samples.map { s in
                .object([("patches", .int(s.latencies.count)), ("patched_sites", .int(s.patchedSites)),
                         ("p50_ms", .number(msValue(percentile(s.latencies, 0.5)))),
                         ("p90_ms", .number(msValue(percentile(s.latencies, 0.9)))),
                         ("max_ms", .number(msValue(percentile(s.latencies, 1)))),
                         ("wall_ms", .number(msValue(s.wallNanoseconds))),
                         ("hot_to_patched_ms", .array(s.latencies.map { .number(msValue($0)) })),
                         ("paused_ms", .array(s.patches.map { .number(msValue($0.pausedNanoseconds)) })),
                         ("deferred_ms", .array(s.patches.map { .number(msValue($0.deferredNanoseconds)) }))])
            }
            let object: JSONValue = .object([
                ("guest", .string(kernel)), ("cpus", .int(cpus)), ("sites_per_vcpu", .int(sites)), ("iters", .int(iters)), ("spin", .int(spin)),
                ("threshold", .int(threshold)), ("runs", .int(runs)), ("patches", .int(all.count)),
                ("p50_ms", .number(msValue(percentile(all, 0.5)))), ("p90_ms", .number(msValue(percentile(all, 0.9)))),
                ("max_ms", .number(msValue(percentile(all, 1)))),
                ("run_p90_min_ms", .number(msValue(runP90.min() ?? 0))), ("run_p90_max_ms", .number(msValue(runP90.max() ?? 0))),
                ("paused_p50_ms", .number(msValue(percentile(paused, 0.5)))), ("paused_p90_ms", .number(msValue(percentile(paused, 0.9)))),
                ("deferred_patches", .int(deferred.count)),
                ("checksums", .string(reference.checksums)), ("per_run", .array(perRun)),
            ])
            print(object.rendered(indent: 2))
            return
        }
        print("dmp-latency: \(kernel) sites=\(sites) iters=\(iters) spin=\(spin), \(cpus) vCPUs (two busy at CPL3), DMP threshold \(threshold), \(runs) runs (fresh VM each)")
        print("hot to patched: from a site becoming hot until every vCPU has resumed with its patch in place; checksums \(reference.checksums) in every run (= DMP off)")
        print(pad("run", 6) + pad("patches", 10, right: true) + pad("p50 ms", 10, right: true) + pad("p90 ms", 10, right: true)
              + pad("max ms", 10, right: true) + pad("wall ms", 10, right: true))
        for (i, s) in samples.enumerated() {
            print(pad(String(i + 1), 6) + pad(String(s.latencies.count), 10, right: true)
                  + pad(ms(percentile(s.latencies, 0.5)), 10, right: true) + pad(ms(percentile(s.latencies, 0.9)), 10, right: true)
                  + pad(ms(percentile(s.latencies, 1)), 10, right: true) + pad(ms(s.wallNanoseconds), 10, right: true))
        }
        print(pad("all", 6) + pad(String(all.count), 10, right: true) + pad(ms(percentile(all, 0.5)), 10, right: true)
              + pad(ms(percentile(all, 0.9)), 10, right: true) + pad(ms(percentile(all, 1)), 10, right: true))
        print("p90 per run: \(ms(runP90.min() ?? 0))–\(ms(runP90.max() ?? 0)) ms")
        print("of which vCPUs paused (kick, write, guard, resume): p50 \(ms(percentile(paused, 0.5))) ms, p90 \(ms(percentile(paused, 0.9))) ms, max \(ms(percentile(paused, 1))) ms")
        if !deferred.isEmpty {
            print("\(deferred.count) patches waited for another vCPU's patch first: p50 \(ms(percentile(deferred, 0.5))) ms, max \(ms(percentile(deferred, 1))) ms of their time")
        }
    }

    /// One run of the guest, with DMP or without.
    private func measure(_ image: [UInt8], dmp: Bool) throws -> Sample {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20, vcpuCount: cpus))
        let console = CapturedOutput()
        let devices = try StandardDevices.install(on: vm, console: console.sink())
        let loaded = try X86Boot.load(.elf(image), commandLine: "sites=\(sites) iters=\(iters) spin=\(spin)", into: vm)
        var middleware: DMPMiddleware?
        if dmp {
            var c = DMPConfiguration()
            c.use(loaded)
            c.userModeFastPaths = true
            c.threshold = threshold
            c.lockedCounters = DMPOptions.lockedCounters
            var logger = Logger(label: "minivmm.dmp-latency")
            logger.logLevel = DMPOptions.logLevel
            middleware = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
        }
        let t0 = monotonicNanoseconds()
        let reason = try vm.run()
        let wall = monotonicNanoseconds() - t0
        let text = console.text
        guard reason == .guestExit(status: 0),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("RESULT ") }) else {
            throw ValidationError("the guest stopped with \(reason)\(dmp ? " (DMP on)" : ""): \(text)")
        }
        let checksums = line.split(separator: " ").filter { $0.hasPrefix("checksum") }.joined(separator: " ")
        let report = middleware?.report() ?? []
        return Sample(patches: middleware?.patchLatencies ?? [], patchedSites: report.filter { $0.state == .patched }.count,
                      checksums: checksums, wallNanoseconds: wall)
    }

    private func percentile(_ v: [UInt64], _ q: Double) -> UInt64 { DMPReport.percentile(v, q) ?? 0 }
    private func msValue(_ ns: UInt64) -> Double { Double(ns) / 1e6 }
    private func ms(_ ns: UInt64) -> String { String((Double(ns) / 1e4).rounded() / 100) }
}
