import VMMKit

/// What the planner decided for one site it serves.
package struct SitePlan: Sendable {
    /// The site.
    package var site: ExitSite
    /// The instruction's guest-virtual start and guest-physical address.
    package var virtualAddress: UInt64
    package var physicalAddress: GuestAddress
    /// The instruction's text.
    package var instruction: String
    /// The device's fast path, described.
    package var fastPath: String
    /// Whether the code runs at CPL3.
    package var userMode: Bool
    /// The enable word the device was granted, and where (revoked on undo).
    package var enableWord: FastPathEnableWord?
    package var grant: (space: BusSpace, address: UInt64)?
    /// What the device granted (the fast path the body is emitted for).
    package var granted: FastPathDescription?
    /// For a shared-slot read: the slot's guest-physical address (beside the enable word; the device writes it).
    package var slot: GuestAddress?
    /// The hit counter's guest-physical address.
    package var hitCounter: GuestAddress?
    /// The site's data chunk in the implant (its enable word, and its hit counter with the wait counter
    /// after it, each in a cache line of its own): the pages the implant mapping check walks for this site's data.
    package var data: GuestRange?
    /// For a ring-append fast path, the ring it appends to (its consumed count bounds the hit counter).
    package var ring: Int?
    /// For a synchronous ring append: its wait counter's guest-physical address (the word after the hit
    /// counter) and the most iterations one append adds to it.
    package var waitCounter: (address: GuestAddress, limit: UInt32)?
}
