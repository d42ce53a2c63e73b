import VMMKit

// Exits from implanted code charged to the sites they serve, and the implant's mapping walked again (a guest
// that changes its page tables does not exit).
extension DMPMiddleware {
    /// Walks patch `id`'s implant mapping again (``ImplantMapping``); undoes the patch, with the reason, if the
    /// guest's page tables no longer map it as when it was patched.
    func recheckMapping(ofPatch id: Int) {
        guard let vm, let mapping = state.withLock({ $0.patches[id]?.mapping }) else { return }
        guard let why = mapping.problem(in: vm.memory) else { return }
        undo(id, reason: DMPMiddleware.unmapped(why), backOff: true)
    }

    /// Walks every live patch's implant mapping again; undoes those that no longer hold.
    func recheckMappings() {
        let ids = state.withLock { $0.patches.keys.sorted() }
        for id in ids { recheckMapping(ofPatch: id) }
    }

    /// The undo reason for a mapping that no longer holds.
    private static func unmapped(_ why: String) -> DMPRefusal {
        DMPRefusal(.implant, "the guest's page tables no longer map the implant as when it was patched: \(why)")
    }

    /// Charges an exit taken from implanted code: returns nil when it was a fallback of a site the patch
    /// serves (counted there), or the site as the original instruction would have caused it.
    @inline(never)
    func chargeImplantExit(owner: Int, rip: UInt64, site: ExitSite) -> ExitSite? {
        state.withLock { s -> ExitSite? in
            guard let p = s.patches[owner] else { return nil }
            // A body's kick of the ring poller is an exit the patch causes, not another access.
            let kick = site.kind == .io && site.direction == .write && planner?.kickPort.map { UInt64($0) == site.address } == true
            guard let copy = p.copy else {
                // A stub: every exit from it is its site's fallback or kick.
                if let served = p.sites.first { DMPMiddleware.charge(&s.sites[served], kick: kick) }
                return nil
            }
            let holder = p.copy(holding: rip) ?? copy
            guard let original = holder.originalAddress(of: rip) else { return nil }
            // A fallback of a served access, or a body's kick, from inside the body; another access of the same
            // instruction (an out-of-line `outb` called for a port no route serves) counts as the original
            // instruction's, a site of its own. An exit at a body's first byte came from the copied instruction
            // before it (RIP past it: stores back to back): a site of its own, at the original's RIP past it.
            let body = holder.bodyOriginal(holding: rip)
            if let body, let served = p.sites.first(where: { ($0.kind == site.kind && $0.address == site.address && $0.size == site.size
                                                    && $0.direction == site.direction || kick)
                                                   && s.sites[$0]?.report.instructionAddress == body }) {
                DMPMiddleware.charge(&s.sites[served], kick: kick)
                return nil
            }
            return ExitSite(rip: original, kind: site.kind, address: site.address, size: site.size, direction: site.direction)
        }
    }

    /// Counts an exit from implanted code against its site: a fallback, or a kick (both are exits the patch did not save).
    private static func charge(_ record: inout SiteRecord?, kick: Bool) {
        record?.report.exitsWhilePatched += 1
        if kick { record?.report.kicksWhilePatched += 1 }
    }
}
