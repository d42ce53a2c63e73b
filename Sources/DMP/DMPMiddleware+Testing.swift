import VMMKit

extension DMPMiddleware {
    /// What tests reach inside this middleware (``DMPTestSeam``). Not for VMMs: nothing here is part of the API.
    package var testSeam: DMPTestSeam { DMPTestSeam(dmp: self) }
}

/// Test-only access to a ``DMPMiddleware``'s internals: running a verification pass or an undo now, and reading
/// where patches keep their counters, slots and code, for tests that write there or check what was released.
/// Kept off the middleware's own surface (reached through ``DMPMiddleware/testSeam``); changes nothing by itself.
package struct DMPTestSeam {
    let dmp: DMPMiddleware

    /// The patcher, for tests that change guest memory at the moment of writing (``Patcher/beforeWriteChecks``).
    package var patcher: Patcher { dmp.patcher }

    /// The implant's code pages claimed so far (nil without an implant).
    package var implantCodePages: GuestRange? { dmp.implant?.codePages }

    /// The host-side writes into guarded pages waiting for the next periodic pass (one per span of pages).
    package var pendingHostWrites: [GuestRange] { dmp.state.withLock { $0.hostWrites } }
    /// Runs one verification pass now (``DMPMiddleware/verifyPatches()``, otherwise run every 20 ms while the VM runs).
    package func verify() { dmp.verifyPatches() }

    /// Runs one pass of the periodic task now (``DMPMiddleware/periodic()``: host writes into guarded pages, failed
    /// undos tried again, mappings checked again, verification; otherwise run every 20 ms while the VM runs).
    package func periodic() { dmp.periodic() }

    /// Takes every live patch's A/B trial (``RateTrial``) as paid: its sites' verification windows open now, for tests
    /// of CPL0 patches on a backend that cannot time one.
    package func concludeTrials() {
        let now = ContinuousClock.now
        dmp.state.withLock { s in
            for (id, p) in s.patches where s.judged.insert(id).inserted {
                s.trials[id] = nil
                for site in p.sites {
                    guard var r = s.sites[site] else { continue }
                    r.window = VerifyWindow(at: r.costs, now: now)
                    s.sites[site] = r
                }
            }
        }
    }

    /// Undoes the patch serving `site` as verification undoes one that did not pay (with back-off), for tests of
    /// what follows; returns whether a patch was undone.
    @discardableResult
    package func undo(_ site: ExitSite, reason: String) -> Bool {
        guard let id = dmp.state.withLock({ $0.sites[site]?.patchID }) else { return false }
        return dmp.undo(id, reason: DMPRefusal(.verify, reason), backOff: true)
    }

    /// The implant address of the copied instruction at the guest-virtual `original` in the live function copy
    /// holding it (the start of its body, for a rewritten one), for tests that exit from it.
    package func copyAddress(of original: UInt64) -> UInt64? {
        dmp.state.withLock { s in s.patches.values.lazy.compactMap { $0.copy?.copyAddress(of: original) }.first }
    }

    /// The guest-physical address of each patched site's hit counter, for tests that write it.
    package var hitCounters: [ExitSite: GuestAddress] {
        dmp.state.withLock { s in s.sites.compactMapValues { $0.patchID == nil ? nil : $0.hits?.counter } }
    }

    /// The shared slots (guest-physical addresses) of the sites patched now, with their sites and enable words
    /// (tests that write into the slots or revoke the grants).
    package var sharedSlots: [(site: ExitSite, slot: GuestAddress, enableWord: FastPathEnableWord)] {
        dmp.state.withLock { s in
            s.order.compactMap { site in
                guard let r = s.sites[site], r.patchID != nil, let slot = r.slot, let w = r.enableWord else { return nil }
                return (site, slot, w)
            }
        }
    }
}
