import ArgumentParser
import DMP
import VMMKit

/// `minivmm detector-bench`: what ``HotspotDetector/record(_:)`` costs per
/// exit, in-process (no guest): a stream of sites shaped like a workload's
/// exits (a few hot sites and a tail of cold ones), nanoseconds per record
/// per run and the range over runs.
struct DetectorBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detector-bench",
        abstract: "Measure DMP's hotspot detector: ns per recorded exit (range over runs).")

    @Option(help: "Runs (each a fresh detector).")
    var runs: Int = 5

    @Option(help: "Exits recorded per run.")
    var exits: Int = 10_000_000

    @Option(help: "Distinct cold sites in the stream (besides 4 hot ones).")
    var coldSites: Int = 1000

    @Option(help: "Threshold and window of the detector.")
    var threshold: Int = 64
    @Option(help: "The sliding window in exits.")
    var window: Int = 4096

    /// Bounds the sizes: `--exits` is a loop count, `--cold-sites` a table size and an address multiplier, and
    /// `--threshold`/`--window` size the detector's window ring; unchecked they trap (a negative range, an overflow)
    /// or exhaust memory.
    func validate() throws {
        guard (1...1000).contains(runs) else { throw ValidationError("--runs must be 1...1000") }
        guard (1...1_000_000_000).contains(exits) else { throw ValidationError("--exits must be 1...1000000000") }
        guard (0...1_000_000).contains(coldSites) else { throw ValidationError("--cold-sites must be 0...1000000") }
        guard (1...1_000_000).contains(threshold) else { throw ValidationError("--threshold must be 1...1000000") }
        guard (1...10_000_000).contains(window) else { throw ValidationError("--window must be 1...10000000") }
    }

    func run() throws {
        // The stream, built before timing: 7 of 8 exits at 4 hot sites, the rest spread over the cold ones.
        var rng = SystemRandomNumberGenerator()
        let streamLength = 1 << 16
        let hot = [ExitSite(rip: 0x10_1234, kind: .io, address: 0x3f8, size: 1, direction: .write),
                   ExitSite(rip: 0x10_1230, kind: .io, address: 0x3fd, size: 1, direction: .read),
                   ExitSite(rip: 0x10_2000, kind: .mmio, address: 0xd000_0040, size: 4, direction: .write),
                   ExitSite(rip: 0x10_2010, kind: .mmio, address: 0xd000_0004, size: 4, direction: .read)]
        let stream: [ExitSite] = (0..<streamLength).map { _ in
            if UInt8.random(in: 0..<8, using: &rng) != 0 { return hot[Int.random(in: 0..<4, using: &rng)] }
            let n = UInt64.random(in: 0..<UInt64(max(1, coldSites)), using: &rng)
            return ExitSite(rip: 0x20_0000 + n * 7, kind: .io, address: 0x80, size: 1, direction: .write)
        }
        print("hotspot detector: \(exits) records per run, 4 hot sites (7/8 of exits) + \(coldSites) cold, threshold \(threshold) window \(window)")
        var perRun: [Double] = []
        let clock = ContinuousClock()
        for i in 0..<max(1, runs) {
            let d = HotspotDetector(threshold: threshold, window: window, capacity: max(4096, 2 * coldSites))
            var candidates = 0
            let elapsed = stream.withUnsafeBufferPointer { s in
                clock.measure {
                    var k = 0
                    for _ in 0..<exits {
                        if d.record(s[k]) { candidates += 1 }
                        k = (k + 1) & (streamLength - 1)
                    }
                }
            }
            let ns = Double(elapsed.components.seconds) * 1e9 + Double(elapsed.components.attoseconds) / 1e9
            let per = ns / Double(max(1, exits))
            perRun.append(per)
            print("  run \(i + 1): \(fmt(per)) ns per record (\(candidates) candidates, \(d.siteCount) sites)")
        }
        let m = perRun.sorted()
        print("  range over \(m.count) runs: \(fmt(m.first ?? 0))–\(fmt(m.last ?? 0)) ns per record (median \(fmt(median(m))) ns)")
        try placementCheck(clock)
    }

    /// The implant's mapping check (re-run at patch time and on fallback exits): one code page and
    /// one data page walked through identity-mapped 4-level tables of 2 MiB pages, a CPL3 site.
    func placementCheck(_ clock: ContinuousClock) throws {
        let memory = try GuestMemory(ranges: [(GuestRange(start: GuestAddress(0), size: 32 << 20), false)])
        try memory.write(UInt64(0x21000 | 7), at: GuestAddress(0x20000))
        try memory.write(UInt64(0x22000 | 7), at: GuestAddress(0x21000))
        for i in 0..<16 as Range<UInt64> { try memory.write(i << 21 | 0x87, at: GuestAddress(0x22000 + i * 8)) }
        let implant = try Implant(area: X86Layout.implantArea)
        let code = try implant.allocateCode(64), data = try implant.allocateData(16)
        let site = ImplantSite(virtualAddress: 0x10_1234, physicalAddress: GuestAddress(0x10_1234), cpl: 3,
                               paging: PagingContext(cr3: 0x20000))
        let checks = 200_000
        var perRun: [Double] = []
        for _ in 0..<max(1, runs) {
            var ok = 0
            let elapsed = try clock.measure {
                for _ in 0..<checks where try implant.placement(for: site, code: code, data: [data], memory: memory).kind == .identity { ok += 1 }
            }
            guard ok == checks else { throw ValidationError("the placement check failed") }
            perRun.append((Double(elapsed.components.seconds) * 1e9 + Double(elapsed.components.attoseconds) / 1e9) / Double(checks))
        }
        let m = perRun.sorted()
        print("implant placement check (1 code + 1 data page, CPL3, identity): \(fmt(m.first ?? 0))–\(fmt(m.last ?? 0)) ns per check over \(m.count) runs")
    }
}
