import VMMKit

/// The DMP report as text (the layout of `minivmm --profile`): one row per
/// site, named by its instruction's start (``PatchSite/location``), then every refusal and undo with its reason,
/// the sites whose exits KVM reports past their instruction, and the user-mode note.
public enum DMPReport {
    /// Renders `sites` (``DMPMiddleware/report()``) as a table; with `latencies`
    /// (``DMPMiddleware/hotToPatchedNanoseconds``) also the hot-to-patched times.
    public static func text(_ sites: [PatchSite], latencies: [UInt64] = []) -> String {
        var out = "\n== DMP report ==\n"
        guard !sites.isEmpty else { return out + "no site became hot\n" }
        out += cell("site", 28) + cell("instruction", 26) + cell("access", 20) + cell("strategy", 50)
            + cell("state", 21) + cell("exits before", 14, right: true) + cell("served in guest", 16, right: true)
            + cell("fallbacks", 10, right: true) + cell("hot→patched", 12, right: true) + "\n"
        for s in sites {
            out += cell(s.shownLocation, 28) + cell(s.instruction.isEmpty ? "?" : s.instruction, 26) + cell(access(s.site), 20)
            out += cell(s.strategy.isEmpty ? "-" : s.strategy, 50) + cell(s.state.rawValue, 21)
            out += cell(String(s.exitsBefore), 14, right: true) + cell(String(s.hitsServed), 16, right: true)
            out += cell(String(s.exitsWhilePatched), 10, right: true)
            out += cell(s.hotToPatchedNanoseconds.map { fixed(Double($0) / 1e6, 2) + " ms" } ?? "-", 12, right: true) + "\n"
        }
        let past = sites.filter(\.exitsPastInstruction)
        if !past.isEmpty {
            out += "\nexits reported past the instruction (KVM completes an out or an MMIO store first; an exit profile "
                + "lists the site at its exit RIP): " + past.map(exitNote).joined(separator: ", ") + "\n"
        }
        let notes = sites.filter { $0.refusal != nil }
        if !notes.isEmpty {
            out += "\nrefused or undone:\n"
            for s in notes { out += "  \(s.shownLocation) (\(access(s.site))): \(s.state.rawValue): \(s.refusal?.description ?? "")\n" }
        }
        let verified = sites.filter { $0.windowsJudged > 0 && $0.state == .patched }
        if !verified.isEmpty {
            out += "\nverified (cost per access in exits, unpatched 1; windows judged, kicks, wait iterations):\n"
            for s in verified {
                out += "  \(s.shownLocation) (\(access(s.site))): \(fixed(s.lastWindowCost ?? 0, 3)) in the last of \(s.windowsJudged) windows; "
                    + "\(s.kicksWhilePatched) kicks, \(s.waitIterations) wait iterations"
                    + (s.trialResult.map { "; A/B trial: \($0)" } ?? "") + "\n"
            }
        }
        let inTrial = sites.filter { $0.trialUnderWay }
        if !inTrial.isEmpty {
            out += "\nA/B trial under way (patched, not judged yet; the trial may still undo it): "
                + inTrial.map(\.shownLocation).joined(separator: ", ") + "\n"
        }
        let undoFailed = sites.filter { $0.undoFailure != nil && $0.state == .patched }
        if !undoFailed.isEmpty {
            out += "\nundo failed (the patch stays in place whole; tried again):\n"
            for s in undoFailed { out += "  \(s.shownLocation) (\(access(s.site))): \(s.undoFailure ?? "")\n" }
        }
        let distrusted = sites.filter { $0.hitCounterDistrust != nil }
        if !distrusted.isEmpty {
            out += "\nhit counters written by the guest (served counts kept at their last plausible value):\n"
            for s in distrusted { out += "  \(s.shownLocation) (\(access(s.site))): \(s.hitCounterDistrust ?? "")\n" }
        }
        let user = sites.filter { $0.userMode && ($0.state == .patched || $0.state == .wouldPatch) }
        if !user.isEmpty {
            out += "\nuser-mode fast paths (they bypass the guest's I/O permission checks and cannot tell address spaces apart): "
            out += user.map(\.shownLocation).joined(separator: ", ") + "\n"
        }
        let patched = sites.filter { $0.state == .patched }
        out += "\n\(patched.count) of \(sites.count) hot sites patched; \(patched.reduce(0) { $0 + $1.exitsAvoided }) exits avoided\n"
        if !latencies.isEmpty {
            func ms(_ q: Double) -> String { fixed(Double(percentile(latencies, q) ?? 0) / 1e6, 2) }
            out += "\(latencies.count) patches applied; hot to patched: p50 \(ms(0.5)) ms, p90 \(ms(0.9)) ms, max \(ms(1)) ms\n"
        }
        return out
    }

    /// The `q` quantile (0...1) of `values` by nearest rank: the value at index `⌊count × q⌋` of the
    /// sorted values (the last for `q` = 1), as the report prints p50 and p90. Nil when `values` is empty.
    public static func percentile(_ values: [UInt64], _ q: Double) -> UInt64? {
        guard !values.isEmpty else { return nil }
        let sorted = values.sorted()
        let rank = q.isFinite ? Int(Double(sorted.count) * min(max(q, 0), 1)) : 0
        return sorted[min(sorted.count - 1, rank)]
    }

    /// `uart_putc+0x11 at +0x12`: a site and where its exits are reported (the symbol said once where both share it).
    static func exitNote(_ s: PatchSite) -> String {
        guard let plus = s.location.lastIndex(of: "+"), s.exitLocation.hasPrefix(s.location[...plus]) else {
            return "\(s.location) at \(s.exitLocation)"
        }
        return "\(s.location) at \(s.exitLocation.dropFirst(s.location.distance(from: s.location.startIndex, to: plus)))"
    }

    /// `port 0x3f8 write1`, `mmio 0xd0000000 read4`.
    static func access(_ s: ExitSite) -> String {
        let dir = s.direction == .write ? "write" : "read"
        let space = s.kind == .io ? "port" : "mmio"
        return "\(space) 0x\(String(s.address, radix: 16)) \(dir)\(s.size)"
    }

    /// `s` in a column `n` wide; a left-aligned value that fills it still gets one space before the next column.
    private static func cell(_ s: String, _ n: Int, right: Bool = false) -> String {
        let p = String(repeating: " ", count: max(right ? 0 : 1, n - s.count))
        return right ? p + s + " " : s + p
    }
}

/// `value` with `digits` decimals (no Foundation).
func fixed(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<max(0, digits) { scale *= 10 }
    let n = (abs(value) * scale).rounded()
    guard n < 9e18 else { return "\(value)" }
    let i = Int64(n)
    let whole = String(i / Int64(scale))
    var frac = String(i % Int64(scale))
    while frac.count < digits { frac = "0" + frac }
    return (value < 0 && i != 0 ? "-" : "") + whole + (digits > 0 ? "." + frac : "")
}
