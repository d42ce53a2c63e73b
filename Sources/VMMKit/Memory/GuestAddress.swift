/// A guest-physical address.
///
/// A distinct type so that guest-physical, guest-virtual and host addresses
/// cannot be mixed up by accident. Arithmetic is checked: use ``adding(_:)``
/// where an overflow is possible.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The address as a 64-bit number.
    public var rawValue: UInt64

    /// Wraps a raw guest-physical address.
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Wraps a raw guest-physical address.
    public init(_ value: UInt64) { self.rawValue = value }

    /// `self + offset`, or `nil` if that overflows 64 bits.
    public func adding(_ offset: UInt64) -> GuestAddress? {
        let (r, o) = rawValue.addingReportingOverflow(offset)
        return o ? nil : GuestAddress(r)
    }

    /// The distance from `base` to `self` (`self - base`), or `nil` if `self` is below `base`.
    public func offset(from base: GuestAddress) -> UInt64? {
        rawValue >= base.rawValue ? rawValue - base.rawValue : nil
    }

    /// Orders addresses numerically.
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }

    /// The address in hexadecimal, e.g. `0x100000`.
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// A half-open range of guest-physical addresses `[start, start + size)`.
public struct GuestRange: Hashable, Sendable, CustomStringConvertible {
    /// The first address in the range.
    public var start: GuestAddress
    /// The number of bytes in the range.
    public var size: UInt64

    /// Creates the range `[start, start + size)`.
    public init(start: GuestAddress, size: UInt64) {
        self.start = start
        self.size = size
    }

    /// The first address past the range, or `nil` if the range reaches the top of the address space.
    public var end: UInt64? {
        let (r, o) = start.rawValue.addingReportingOverflow(size)
        return o ? nil : r
    }

    /// Whether `address` lies in the range.
    public func contains(_ address: GuestAddress) -> Bool {
        guard let off = address.offset(from: start) else { return false }
        return off < size
    }

    /// Whether `[address, address + length)` lies wholly in the range.
    public func contains(_ address: GuestAddress, length: UInt64) -> Bool {
        guard let off = address.offset(from: start), off <= size else { return false }
        return length <= size - off
    }

    /// Whether the two ranges share at least one address.
    public func overlaps(_ other: GuestRange) -> Bool {
        if size == 0 || other.size == 0 { return false }
        let aEnd = start.rawValue &+ (size - 1)
        let bEnd = other.start.rawValue &+ (other.size - 1)
        return start.rawValue <= bEnd && other.start.rawValue <= aEnd
    }

    /// `[start, end)` in hexadecimal.
    public var description: String {
        "[\(start), 0x\(String(start.rawValue &+ size, radix: 16)))"
    }
}
