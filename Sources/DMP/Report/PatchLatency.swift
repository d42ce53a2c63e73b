/// Where one applied patch spent its time from its site becoming hot until
/// every vCPU had resumed with the patch in place (``DMPMiddleware/patchLatencies``).
public struct PatchLatency: Hashable, Sendable {
    /// The whole time, from the moment the site first became hot.
    public var hotToPatchedNanoseconds: UInt64
    /// The part spent waiting for another vCPU's patch to finish (the site was put off and became hot again).
    public var deferredNanoseconds: UInt64
    /// The part with every vCPU paused: kicking them out of the guest, writing, guarding pages, resuming.
    public var pausedNanoseconds: UInt64

    /// Creates a record.
    public init(hotToPatchedNanoseconds: UInt64, deferredNanoseconds: UInt64, pausedNanoseconds: UInt64) {
        self.hotToPatchedNanoseconds = hotToPatchedNanoseconds
        self.deferredNanoseconds = deferredNanoseconds
        self.pausedNanoseconds = pausedNanoseconds
    }
}
