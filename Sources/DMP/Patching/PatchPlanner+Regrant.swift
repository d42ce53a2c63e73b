import VMMKit

extension PatchPlanner {
    /// Asks the device again for the fast path `granted` that `site`'s body was emitted for, handing it the same
    /// enable word (and, for a shared-slot read, the same slot at `slot`): a site turned off alone inside its
    /// function copy (its grant revoked) whose back-off is over (DESIGN.md, DMP step 7). The device answering
    /// anything else (another kind, another ring or mode, a read now dependent on pending ring entries) would
    /// not fit the body: that grant is revoked at once and the site stays off.
    package func regrant(_ site: ExitSite, enableWord: FastPathEnableWord, slot: GuestAddress?,
                         granted: FastPathDescription) throws(DMPRefusal) {
        let (space, ring) = target(of: site)
        var handle: FastPathSlot?
        if let slot, case .sharedSlotRead(let index) = granted.kind {
            do { handle = try FastPathSlot(memory: vm.memory, at: slot, index: index) } catch {
                throw DMPRefusal(.implant, "cannot place the shared slot at \(slot) again: \(error)")
            }
        }
        let now: FastPathDescription
        do {
            now = try vm.bus.grantFastPath(space: space, address: site.address, size: Int(site.size), direction: site.direction,
                                           ring: ring, slot: handle, enableWord: enableWord).description
        } catch {
            throw DMPRefusal(.fastPath, "\(error)")
        }
        guard now == granted else {
            vm.bus.revokeFastPath(space: space, address: site.address, enableWord: enableWord)
            throw DMPRefusal(.fastPath, "the device now grants \(PatchPlanner.describe(now.kind)), the body serves "
                             + "\(PatchPlanner.describe(granted.kind))")
        }
    }
}
