/// How an A/B trial's switch of a patch came out (``Patcher/suspend(_:)``, ``Patcher/resume(_:)``); failures of
/// another kind (an ioctl, bytes the guest changed) are thrown as refusals.
package enum PatchSwitch: Equatable, Sendable {
    /// The bytes were written.
    case switched
    /// Nothing was written: a vCPU was paused inside bytes the switch would change (``VCPUInside``); the switch
    /// may be tried again once it has moved on.
    case busy(VCPUInside)
}
