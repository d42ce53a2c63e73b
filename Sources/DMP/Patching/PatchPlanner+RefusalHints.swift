import VMMKit

extension PatchPlanner {
    /// What to add to a declined write's refusal when no paravirtual ring targets its register: a device can
    /// offer a ring append (the usual fast path for a write) only for a register a ring feeds, so the VMM's
    /// missing ring is the likelier cause than the device. Empty otherwise.
    static func noRingHint(_ error: FastPathRefusal, direction: AccessDirection, ring: Int?, rings: Bool) -> String {
        guard case .declined = error, direction == .write, ring == nil else { return "" }
        return rings
            ? " (no paravirtual ring targets this register: a device can offer a ring append only for a register a ring feeds; "
                + "add one with StandardDevices.install(on:console:extraRingTargets:))"
            : " (DMP was installed without rings: a device can offer a ring append only for a register a ring feeds)"
    }
}
