/// The POST-code port (port `0x80` on a PC): guests write to it as an I/O
/// delay (`outb` to `0x80` after a slow device access, as GCC-compiled kernels
/// and firmware do) or to report boot progress. Writes are dropped; reads
/// return all ones, like QEMU's.
///
/// Fast path: every write (1, 2 or 4 bytes) is a ``FastPathKind/discardWrite``,
/// always exact. Attach it at one port (``StandardDevices`` puts it at `0x80`).
public final class PostCodePort: BusDevice, @unchecked Sendable {
    /// `post-code`.
    public let name = "post-code"
    private let lock = ConditionLock()
    private var grants = FastPathGrants()

    /// Creates the device.
    public init() {}
    /// Reads return all ones.
    public func read(offset: UInt64, size: Int) -> UInt64 { allOnes(size: size) }
    /// Writes are dropped.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { .none }

    /// Grants writes at offset 0 as discarded writes.
    public func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        guard request.offset == 0, request.direction == .write, request.size <= 4 else { return nil }
        let d = FastPathDescription(.discardWrite, for: request)
        lock.withLock { grants.add(d, word: enableWord, exact: true) }
        return d
    }

    /// Forgets a grant and clears its word.
    public func revokeFastPath(_ enableWord: FastPathEnableWord) {
        lock.withLock { grants.remove(enableWord) }
    }
}
