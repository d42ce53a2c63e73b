/// A registration of an eventfd signalled when the guest writes an address (`KVM_IOEVENTFD`).
public struct IOEventFD: Hashable, Sendable {
    /// The address or port.
    public var address: UInt64
    /// The access width (0 = any, or 1, 2, 4, 8).
    public var length: UInt32
    /// The eventfd.
    public var fd: Int32
    /// Port I/O instead of MMIO.
    public var isPIO: Bool
    /// Only writes of this value signal (nil: any value).
    public var datamatch: UInt64?
    /// Creates a registration.
    public init(address: UInt64, length: UInt32, fd: Int32, isPIO: Bool, datamatch: UInt64? = nil) {
        self.address = address; self.length = length; self.fd = fd; self.isPIO = isPIO; self.datamatch = datamatch
    }
}
