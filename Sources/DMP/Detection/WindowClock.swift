/// One vCPU's DMP state on the exit path: its detector, how many re-arm requests it applied, and the time
/// sampled every ``stride`` exits, so the time the last N exits took is known without a clock read per exit.
final class WindowClock: @unchecked Sendable {
    /// The vCPU's detector (here too, so the exit path touches one per-vCPU object).
    let detector: HotspotDetector
    /// How many re-arm requests this vCPU has applied.
    var rearmed = 0

    init(detector: HotspotDetector) { self.detector = detector }
    private var exits = 0
    private var samples = [ContinuousClock.Instant](repeating: .now, count: 64)

    /// Counts one exit.
    @inline(__always)
    func tick() {
        exits &+= 1
        if exits & (WindowClock.stride - 1) == 0 { samples[(exits / WindowClock.stride) & 63] = .now }
    }

    /// Exits between two samples.
    static let stride = 64

    /// Seconds the last `n` exits took (fewer when fewer were seen; rounded to ``stride``), and how many
    /// exits that was; nil before the first sample.
    func secondsForLast(_ n: Int) -> (seconds: Double, exits: Int)? {
        let newest = exits / WindowClock.stride
        let back = min(max(1, n / WindowClock.stride), 63, newest - 1)
        guard back >= 1 else { return nil }
        let then = samples[(newest - back) & 63]
        let d = ContinuousClock.now - then
        let (s, a) = d.components
        return (Double(s) + Double(a) / 1e18, back * WindowClock.stride + exits % WindowClock.stride)
    }
}
