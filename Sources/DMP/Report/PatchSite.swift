import VMMKit

/// One site DMP looked at: where it is, what was decided and what it achieved
/// (DESIGN.md, DMP step 8). A value snapshot, taken by ``DMPMiddleware/report()``.
public struct PatchSite: Hashable, Sendable, CustomStringConvertible {
    /// What became of the site.
    public enum State: String, Hashable, Sendable {
        /// Hot, not yet decided.
        case candidate
        /// A patch is in place and serving.
        case patched
        /// `dryRun`: would be patched.
        case wouldPatch = "would patch"
        /// Not patchable (see ``PatchSite/refusal``).
        case refused
        /// Patched, then undone (did not pay, invalidated by a guest write); may be retried after back-off.
        case undone
        /// Its fast path turned off alone (DESIGN.md, DMP step 7): it did not pay, while the function copy that
        /// serves it stays in place for the copy's other sites, which do. Its accesses run the original instruction
        /// in the copy (they exit, as unpatched) until the device grants the fast path again after back-off
        /// (``PatchSite/refusal`` gives the figures and the back-off).
        case disabled = "undone (did not pay)"
    }

    /// The exit site (RIP as the exit reported it, and the access).
    public var site: ExitSite
    /// The instruction's guest-virtual start, once located.
    public var instructionAddress: UInt64?
    /// The instruction's guest-physical start under its address space, once located.
    public var physicalAddress: GuestAddress?
    /// Where the site's instruction starts, `symbol+offset` (an address without symbols), once located
    /// (``instructionAddress``). Until then, and for a site that could not be located, where the exit's RIP was
    /// (``exitLocation``; the report marks it `(exit rip)`). For an accessor's instruction served from a caller's
    /// copy, `accessor+offset via caller+offset` (the promoted call's start).
    public var location: String
    /// Where the exit's RIP was, `symbol+offset`: KVM completes an `out` and an MMIO store before it exits, so for
    /// those it names the next instruction (the `out` at `uart_putc+0x11` exits at `uart_putc+0x12`), as an exit
    /// profile keyed by RIP lists the site. Empty for an accessor's instruction served from a caller's copy (its
    /// key's RIP is the promoted call's, where no exit is).
    public var exitLocation: String
    /// The instruction's text (`out dx, al`), once located.
    public var instruction: String
    /// The shape used or planned (`instruction stub`, `function copy of f via entry`), empty when none.
    public var strategy: String
    /// The fast path the device granted (its description), empty when none.
    public var fastPath: String
    /// Whether the fast path serves code at CPL3 (a privilege change the guest did not grant: see ``DMPConfiguration/userModeFastPaths``).
    public var userMode: Bool
    /// The state.
    public var state: State
    /// Exits the site caused before it was patched.
    public var exitsBefore: Int
    /// Accesses served in the guest by the implant: its hit counter, believed only while its changes are plausible (see ``hitCounterDistrust``).
    public var hitsServed: UInt64
    /// Exits the site caused while patched: fallbacks (the original instruction ran) and kicks of the ring poller.
    public var exitsWhilePatched: Int
    /// Of ``exitsWhilePatched``, the kicks: a served ring append that found the poller asleep, or whose bounded
    /// wait for the consumer ran out, and wrote the kick register (an exit, not another access).
    public var kicksWhilePatched: Int = 0
    /// Iterations the site's synchronous ring appends spent waiting for the consumer while patched (their wait
    /// counter, believed only while plausible, like the hit counter).
    public var waitIterations: UInt64 = 0
    /// Verification windows judged while patched (idle ones not counted).
    public var windowsJudged: Int = 0
    /// The cost per access, in exits, of the last verification window judged (nil before the first).
    public var lastWindowCost: Double?
    /// For a patch of CPL0 code that passed its A/B trial (the patch taken out and written again in alternating
    /// phases, ``DMPConfiguration/trialPhaseSeconds``): the accesses per second patched and unpatched and the
    /// median ratio. A trial that lost undoes the patch; ``refusal`` then gives the figures.
    public var trialResult: String?
    /// True while the site's patch, of CPL0 code, is in its A/B trial and not judged yet: its state says
    /// ``State/patched`` but the trial may still undo it.
    public var trialUnderWay: Bool = false
    /// Nanoseconds from the site becoming hot to every vCPU resuming with the patch in place.
    public var hotToPatchedNanoseconds: UInt64?
    /// Why it was refused or undone.
    public var refusal: DMPRefusal?
    /// Times the site's fast path was turned off alone inside its copy (``State/disabled``), each followed by an
    /// exponential back-off before the fast path is granted again.
    public var turnedOff: Int = 0
    /// Why the last attempt to undo its patch failed (an ioctl failed while unpatching), if it did: the patch
    /// stays in place whole and serving, and the undo is tried again (DMP's periodic task, ``DMPMiddleware/unpatchAll()``).
    public var undoFailure: String?
    /// Why the site's hit counter stopped being believed, if it did: the guest wrote it (it went down, rose
    /// faster than one hit per nanosecond, or past what the site's ring consumed). ``hitsServed`` then stays
    /// at its last plausible value and verification judges the patch by its exits alone.
    public var hitCounterDistrust: String?

    /// One line: location, instruction, state, strategy and the reason, if any.
    public var description: String {
        "\(shownLocation) \(instruction.isEmpty ? "?" : instruction) \(state.rawValue)"
            + (strategy.isEmpty ? "" : " (\(strategy))") + (refusal.map { ": \($0)" } ?? "")
    }

    /// ``location``, marked `(exit rip)` while it names the exit's RIP (the instruction not located).
    var shownLocation: String {
        instructionAddress == nil && location == exitLocation && !location.isEmpty ? location + " (exit rip)" : location
    }

    /// Whether the exit's RIP is not where the instruction starts (an `out` or an MMIO store, completed before the exit).
    var exitsPastInstruction: Bool {
        guard let a = instructionAddress, !exitLocation.isEmpty else { return false }
        return a != site.rip
    }

    /// Exits avoided: hits served in the guest (each would have been an exit).
    public var exitsAvoided: UInt64 { hitsServed }

    /// Creates a record; `exitLocation` nil: the same as `location`.
    public init(site: ExitSite, instructionAddress: UInt64? = nil, physicalAddress: GuestAddress? = nil,
                location: String = "", exitLocation: String? = nil, instruction: String = "", strategy: String = "",
                fastPath: String = "", userMode: Bool = false, state: State = .candidate, exitsBefore: Int = 0,
                hitsServed: UInt64 = 0, exitsWhilePatched: Int = 0, hotToPatchedNanoseconds: UInt64? = nil,
                refusal: DMPRefusal? = nil) {
        self.site = site; self.instructionAddress = instructionAddress; self.physicalAddress = physicalAddress
        self.location = location; self.exitLocation = exitLocation ?? location
        self.instruction = instruction; self.strategy = strategy; self.fastPath = fastPath
        self.userMode = userMode; self.state = state; self.exitsBefore = exitsBefore; self.hitsServed = hitsServed
        self.exitsWhilePatched = exitsWhilePatched; self.hotToPatchedNanoseconds = hotToPatchedNanoseconds
        self.refusal = refusal
    }
}
