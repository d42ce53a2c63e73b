/// Why DMP did not patch a site, or undid a patch: the stage that decided and a reason a person can read.
///
/// Every refusal is recorded in the site's report (``PatchSite/refusal``) and told
/// through the configured `Logger`.
public struct DMPRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// The step of the pipeline (DESIGN.md, "The DMP pipeline") that refused.
    public enum Stage: String, Hashable, Sendable {
        /// Finding the instruction that caused the exit (bracketing, operand matching).
        case locate
        /// Asking the device that owns the access for a fast path.
        case fastPath = "fast path"
        /// Choosing a patch shape (instruction stub, function copy) and checking its rules.
        case plan
        /// Encoding the implanted code.
        case encode
        /// Placing code and data in the implant and checking the guest's mappings of it.
        case implant
        /// Guarding the patched pages.
        case `guard`
        /// Writing the patch into the running guest.
        case patch
        /// Measuring the patch after the fact (it did not pay, it was invalidated).
        case verify
    }

    /// The stage that refused.
    public var stage: Stage
    /// What was wrong, for people: short, specific, no trailing period.
    public var reason: String

    /// Creates a refusal.
    public init(_ stage: Stage, _ reason: String) { self.stage = stage; self.reason = reason }

    /// `stage: reason`.
    public var description: String { "\(stage.rawValue): \(reason)" }
}
