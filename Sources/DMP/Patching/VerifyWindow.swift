/// What a patched site has cost since its patch went live, in counts DMP observes (DESIGN.md, DMP step 7).
package struct SiteCosts: Sendable, Equatable {
    /// Accesses served in the guest (the hit counter, as far as it is believed).
    package var hits: UInt64 = 0
    /// Exits charged to the site: fallbacks (the original instruction ran) and kicks of the ring poller.
    package var exits = 0
    /// Of ``exits``, the kicks (a served append that exited once more, not a second access).
    package var kicks = 0
    /// Iterations synchronous appends spent waiting for the consumer (the wait counter, as far as it is believed).
    package var waitIterations: UInt64 = 0

    /// Creates a snapshot.
    package init(hits: UInt64 = 0, exits: Int = 0, kicks: Int = 0, waitIterations: UInt64 = 0) {
        self.hits = hits; self.exits = exits; self.kicks = kicks; self.waitIterations = waitIterations
    }

    /// The accesses: every hit, and every fallback (an access that exited instead); kicks are not accesses.
    package var accesses: UInt64 { hits &+ UInt64(max(0, exits - kicks)) }
}

/// One patched site's verification over the patch's life: its costs are judged in windows of accesses, each
/// against what the site cost unpatched (one exit per access), with hysteresis (DESIGN.md, DMP step 7).
///
/// A window closes once the site made ``DMPConfiguration/verifyWindowAccesses`` accesses since it opened, once
/// it is ``DMPConfiguration/verifyWindowSeconds`` old, or once its costs exceed what a full window may cost (it
/// has lost whatever comes; at least an eighth of a window's accesses are needed); an old window with fewer than an eighth of that many
/// accesses is *idle* and judges nothing (a site the guest stopped using is not a loss). The cost of a window is
/// its exits (fallbacks and kicks) plus its wait iterations at ``DMPConfiguration/waitIterationsPerExit`` per
/// exit, per access. Above ``DMPConfiguration/verifyCostLimit`` the window *loses*; at half the limit or less
/// it *pays* and ends a losing streak; in between the streak stands. ``shouldUndo(_:)`` once
/// ``DMPConfiguration/verifyLosingWindows`` windows in a row lost.
package struct VerifyWindow: Sendable {
    /// What a window closed as.
    package enum Verdict: Equatable, Sendable {
        /// Still open.
        case open
        /// Too few accesses to judge (the guest used the site little or not at all).
        case idle
        /// Cost per access, in exits, at most half the limit.
        case pays(Double)
        /// Cost per access between half the limit and the limit: the streak stands.
        case unclear(Double)
        /// Cost per access above the limit.
        case loses(Double)
    }

    /// The counts when the window opened.
    package private(set) var start: SiteCosts
    /// When the window opened.
    package private(set) var openedAt: ContinuousClock.Instant
    /// Windows lost in a row.
    package private(set) var losingStreak = 0
    /// Windows judged (not idle) since the patch.
    package private(set) var judged = 0
    /// The costs of the last window judged, and its cost per access in exits.
    package private(set) var last: (costs: SiteCosts, costPerAccess: Double)?

    /// A window opening at `costs` (the site's counts when its patch went live).
    package init(at costs: SiteCosts, now: ContinuousClock.Instant = .now) {
        start = costs
        openedAt = now
    }

    /// Takes the site's counts now; closes and judges the window if it is complete.
    package mutating func observe(_ costs: SiteCosts, now: ContinuousClock.Instant = .now,
                                  configuration c: DMPConfiguration) -> Verdict {
        let d = SiteCosts(hits: costs.hits &- min(costs.hits, start.hits), exits: max(0, costs.exits - start.exits),
                          kicks: max(0, costs.kicks - start.kicks),
                          waitIterations: costs.waitIterations &- min(costs.waitIterations, start.waitIterations))
        let window = UInt64(max(1, c.verifyWindowAccesses))
        let minimum = max(1, window / 8)
        let age = now - openedAt
        let old = age >= VerifyWindow.duration(seconds: c.verifyWindowSeconds)
        // A window whose costs already exceed what a full window may cost loses now, whatever its other
        // accesses would bring (a site at tens of exits per access takes 3 windows of milliseconds, not seconds).
        let lost = d.accesses >= minimum && VerifyWindow.exits(d, c.waitIterationsPerExit) > c.verifyCostLimit * Double(window)
        guard d.accesses >= window || old || lost else { return .open }
        start = costs
        openedAt = now
        guard d.accesses >= minimum else { return .idle }
        let cost = VerifyWindow.costPerAccess(d, waitIterationsPerExit: c.waitIterationsPerExit)
        judged += 1
        last = (d, cost)
        if cost > c.verifyCostLimit {
            losingStreak += 1
            return .loses(cost)
        }
        if cost <= c.verifyCostLimit / 2 {
            losingStreak = 0
            return .pays(cost)
        }
        return .unclear(cost)
    }

    /// Whether the site lost enough windows in a row to be undone.
    package func shouldUndo(_ c: DMPConfiguration) -> Bool { losingStreak >= max(1, c.verifyLosingWindows) }

    /// `seconds` as a duration, saturating: zero for NaN or a value at most 0, `Int64.max` nanoseconds (about
    /// 292 years) for anything longer, infinity included (``DMPConfiguration/validate()`` keeps a middleware's
    /// configuration far inside).
    package static func duration(seconds: Double) -> Duration {
        guard seconds > 0 else { return .zero }
        let nanoseconds = seconds * 1e9
        return .nanoseconds(nanoseconds < 9.2e18 ? Int64(nanoseconds) : .max)
    }

    /// A window's cost per access in exits: its exits and its wait iterations (as exits) over its accesses.
    package static func costPerAccess(_ d: SiteCosts, waitIterationsPerExit: Int) -> Double {
        guard d.accesses > 0 else { return 0 }
        return exits(d, waitIterationsPerExit) / Double(d.accesses)
    }

    /// A window's whole cost in exits: its exits and its wait iterations counted as exits.
    static func exits(_ d: SiteCosts, _ waitIterationsPerExit: Int) -> Double {
        Double(d.exits) + Double(d.waitIterations) / Double(max(1, waitIterationsPerExit))
    }

    /// The undo reason for a site that lost its windows.
    package func reason(_ c: DMPConfiguration) -> String {
        guard let (d, cost) = last else { return "its windows lost" }
        var parts = ["\(d.hits) served in the guest", "\(d.exits - d.kicks) fallbacks", "\(d.kicks) kicks"]
        if d.waitIterations > 0 { parts.append("\(d.waitIterations) wait iterations (\(c.waitIterationsPerExit) count as an exit)") }
        return "slower with the patch: \(fixed(cost, 2)) exits per access in \(losingStreak) windows in a row "
            + "(the last: \(d.accesses) accesses, \(parts.joined(separator: ", "))), "
            + "above the limit of \(fixed(c.verifyCostLimit, 2)); unpatched, every access was one exit"
    }
}
