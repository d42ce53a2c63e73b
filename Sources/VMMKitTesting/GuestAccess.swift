import VMMKit

/// One guest access to a device register, as a ``FastPathSubject`` generates them.
public struct GuestAccess: Hashable, Sendable, CustomStringConvertible {
    /// The register's offset in the device's range.
    public var offset: UInt64
    /// The width in bytes (1, 2, 4 or 8).
    public var size: Int
    /// Read or write.
    public var direction: AccessDirection
    /// The value a write stores (ignored for reads).
    public var value: UInt64
    /// An access.
    public init(offset: UInt64, size: Int, direction: AccessDirection, value: UInt64 = 0) {
        self.offset = offset; self.size = size; self.direction = direction; self.value = value
    }
    /// `r<offset>` or `w<offset>=<value in hex>`.
    public var description: String { direction == .read ? "r\(offset)" : "w\(offset)=\(String(value, radix: 16))" }
}
