/// A planned (and, unless a dry run, applied) patch.
package struct PlanOutcome: Sendable {
    /// The patch in place, or nil for a dry run.
    package var applied: AppliedPatch?
    /// The shape (`instruction stub`, `function copy of f via entry instruction`).
    package var strategy: String
    /// The sites it serves, the candidate first.
    package var sites: [SitePlan]
    /// Nanoseconds the vCPUs were paused for the write.
    package var pausedNanoseconds: UInt64
}
