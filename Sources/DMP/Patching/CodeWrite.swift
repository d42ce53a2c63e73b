import VMMKit

/// One instruction's worth of bytes to change in running guest code (or to restore).
package struct CodeWrite: Hashable, Sendable {
    /// The instruction's guest-virtual address in the address space it was located in.
    package var virtual: UInt64
    /// The instruction's guest-physical address.
    package var physical: GuestAddress
    /// The bytes there when the patch was planned (restored by an undo).
    package var original: [UInt8]
    /// The bytes written by the patch (`jmp rel32` and NOP padding; the same length as `original`).
    package var replacement: [UInt8]
    /// Whether a vCPU whose RIP is at the first byte also blocks the write: true for a `jmp rel32` placed in
    /// dead padding (a thread between the `jmp rel8` and it would resume in restored fill bytes).
    package var guardsItsStart: Bool
    /// The bytes there when the write is applied, where they are not ``original``: a rebuilt function copy's
    /// entry holds the old copy's jump (``original`` stays the guest's own bytes, for the undo).
    package var current: [UInt8]?

    /// Creates a write.
    package init(virtual: UInt64, physical: GuestAddress, original: [UInt8], replacement: [UInt8], guardsItsStart: Bool = false,
                 current: [UInt8]? = nil) {
        self.virtual = virtual; self.physical = physical; self.original = original; self.replacement = replacement
        self.guardsItsStart = guardsItsStart; self.current = current
    }

    /// The bytes the write expects to find.
    package var expected: [UInt8] { current ?? original }
}
