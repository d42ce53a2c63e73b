import VMMKit

/// What DMP keeps about one site between exits (behind the middleware's state lock).
package struct SiteRecord: Sendable {
    /// The report row, kept current.
    package var report: PatchSite
    /// Whether the row's ``PatchSite/location`` names its instruction (set once located; renamed if located again).
    package var namedByInstruction = false
    /// The patch serving the site, if one is in place.
    package var patchID: Int?
    /// The enable word the device was granted for the site (revoked on undo).
    package var enableWord: FastPathEnableWord?
    /// For a shared-slot read: the slot's guest-physical address (never read by the VMM: the guest may write it).
    package var slot: GuestAddress?
    /// The device's fast path, for revoking it.
    package var grant: (space: BusSpace, address: UInt64)?
    /// What the device granted, the fast path the site's body was emitted for (a grant asked for again after the
    /// site was turned off alone must be the same).
    package var granted: FastPathDescription?
    /// For a site turned off alone inside its copy (``PatchSite/State/disabled``): its exits while patched
    /// (``PatchSite/exitsWhilePatched``, each a fallback: an access that exited, as unpatched) at which its fast
    /// path is asked for again; nil: never again (``DMPConfiguration/maximumUndos``).
    package var reenableAtExits: Int?
    /// Exits at the site's original instruction while its patch was live: a path the patch does not cover, or an
    /// A/B trial's off phase (``RateTrial``), when the original bytes are back.
    package var exitsAtOriginal = 0
    /// ``exitsAtOriginal`` when the current patch went live (a copy whose entries are off the path the guest takes
    /// shows by its original instruction exiting on: ``DMPMiddleware/watchUnservedCopies()``).
    package var exitsAtOriginalAtPatch = 0
    /// Whether the site's fast path appends to a ring (its patch is one of the ring device's producers).
    package var ringProducer = false
    /// The site's hit counter in the implant data page, as far as it is believed (the guest may write any value there).
    package var hits: HitCount?
    /// Accesses per second before the patch (the site's exits in the detector's window over the window's time).
    package var baselineRate: Double?
    /// Exits charged to the site while patched, at the last verification.
    package var undos = 0
    /// The site's total exit count (detector) at which it may be tried again after an undo.
    package var retryAtExits: Int?
    /// When the site became hot (for hot-to-patched time).
    package var hotAt: ContinuousClock.Instant?
    /// The patch's verification window over the site (opened when the patch went live).
    package var window: VerifyWindow?

    /// What the site cost since DMP first saw it patched: hits and wait iterations of the current patch,
    /// exits and kicks charged over all its patches (a window takes differences).
    package var costs: SiteCosts {
        SiteCosts(hits: hits?.counted ?? 0, exits: report.exitsWhilePatched, kicks: report.kicksWhilePatched,
                  waitIterations: hits?.waited ?? 0)
    }

    /// A new record for a site that became hot.
    package init(report: PatchSite) { self.report = report }

    /// The back-off after the `undos`-th undo: `base` (at least 1) doubled for each undo after the first, at most
    /// 20 times, saturating at `Int.max` (``DMPConfiguration/validate()`` keeps a middleware's base far below).
    package static func backOff(base: Int, undos: Int) -> Int {
        let (exits, overflow) = max(1, base).multipliedReportingOverflow(by: 1 << min(max(0, undos - 1), 20))
        return overflow ? .max : exits
    }

    /// `a + b`, saturating at `Int.max` and `Int.min` (back-off counts added to exit counts).
    package static func saturatingSum(_ a: Int, _ b: Int) -> Int {
        let (sum, overflow) = a.addingReportingOverflow(b)
        return overflow ? (b > 0 ? .max : .min) : sum
    }

    /// Whether the back-off after the site's last undo is over at `total`, the site's exits as a vCPU's detector
    /// counts them (the back-off starts at the first look after the undo: ``retryAtExits`` negative until then).
    /// Never over once the site was undone ``DMPConfiguration/maximumUndos`` times (``retryAtExits`` nil).
    package mutating func backOffOver(atExits total: Int) -> Bool {
        guard var at = retryAtExits else { return false }
        if at < 0 {
            at = SiteRecord.saturatingSum(total, -at)
            retryAtExits = at
        }
        return total >= at
    }

    /// Whether the site keeps its function copy in place when another site of the copy loses: its fast path is on,
    /// it served accesses in the guest (a hit counter believed), and its last window judged, if any, did not lose.
    /// A copy none of whose other sites does this is undone whole.
    package func keepsCopy(_ c: DMPConfiguration) -> Bool {
        guard report.state == .patched, report.hitCounterDistrust == nil, (hits?.counted ?? 0) > 0 else { return false }
        return window?.last.map { $0.costPerAccess <= c.verifyCostLimit } ?? true
    }
}
