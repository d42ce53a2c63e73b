/// One vCPU's DMP state on the exit path: its detector, how many re-arm requests it applied, and the time
/// sampled every ``stride`` exits, so the time the last N exits took is known without a clock read per exit.
///
/// The exit path reaches it through an `Unmanaged` reference (``DMPMiddleware`` keeps it alive) and its
/// fields are only touched by the vCPU's own thread (or while it is paused), so they skip the run-time
/// exclusivity checks.
final class WindowClock: @unchecked Sendable {
    /// The vCPU's detector (here too, so the exit path touches one per-vCPU object).
    let detector: HotspotDetector
    /// How many re-arm requests this vCPU has applied.
    @exclusivity(unchecked) var rearmed = 0

    @exclusivity(unchecked) private var exits = 0
    /// The sample ring: 64 instants, one every ``stride`` exits.
    private let samples: UnsafeMutablePointer<ContinuousClock.Instant>

    init(detector: HotspotDetector) {
        self.detector = detector
        samples = .allocate(capacity: 64)
        samples.initialize(repeating: .now, count: 64)
    }

    deinit { samples.deallocate() }

    /// Counts one exit.
    @inline(__always)
    func tick() {
        exits &+= 1
        if exits & (WindowClock.stride - 1) == 0 { sample() }
    }

    @inline(never)
    private func sample() { samples[(exits / WindowClock.stride) & 63] = .now }

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
