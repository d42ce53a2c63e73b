/// One write into guest code: where, the bytes there before, and the bytes to put
/// there (the same length). Unpatching writes `original` back, and only where
/// `replacement` is still in place.
package struct PatchWrite: Hashable, Sendable {
    /// The guest-virtual address of the first byte.
    package var address: UInt64
    /// The bytes there now (restored by unpatching).
    package var original: [UInt8]
    /// The bytes to write.
    package var replacement: [UInt8]

    /// Creates a write.
    package init(address: UInt64, original: [UInt8], replacement: [UInt8]) {
        self.address = address; self.original = original; self.replacement = replacement
    }

    /// The bytes it changes.
    package var range: Range<UInt64> { address..<address &+ UInt64(replacement.count) }
}
