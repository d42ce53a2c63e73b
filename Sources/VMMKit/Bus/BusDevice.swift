import Synchronization

/// What a device asks of the VM after an access.
public enum DeviceEffect: Hashable, Sendable {
    /// Nothing: the access is complete.
    case none
    /// Stop the VM with this guest exit status (the debug-exit port).
    case stopVM(status: UInt32)
}

/// A device on the I/O bus: a plain type that serves reads and writes of its
/// registers. Devices know nothing about KVM or about where a platform puts them.
///
/// The bus takes no lock around device calls: `read`, `write` and the
/// fast-path calls arrive concurrently from every vCPU thread, the ring
/// consumer and the VM's timer thread. A device guards its own state with its
/// own lock (a stateless device needs none), and does slow host work (writing
/// to a terminal) outside that lock.
public protocol BusDevice: AnyObject {
    /// A short name for diagnostics (`uart`, `debug-exit`).
    var name: String { get }
    /// Reads `size` bytes at `offset` from the start of the range the device
    /// was attached at. The bus passes only sizes 1, 2, 4 and 8.
    func read(offset: UInt64, size: Int) -> UInt64
    /// Writes `size` bytes (1, 2, 4 or 8) of `value` at `offset`.
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect
    /// Grants a fast path for one register access, or returns `nil` for none.
    ///
    /// Answer under the lock that guards the device's state, and in the same
    /// critical section record `enableWord` (``FastPathGrants``) and set it
    /// when the state makes the fast path exact now, clear it otherwise. From
    /// then on, clear it under that lock before any access or host call that
    /// breaks a precondition returns, and set it only once the state is exact
    /// again. Offer no fast path for reads with side effects or for writes
    /// whose effect the guest could observe before the entry is applied.
    func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription?
    /// Forgets a grant made with `enableWord` and clears the word; the device
    /// never writes it again. Unknown words are ignored.
    func revokeFastPath(_ enableWord: FastPathEnableWord)
    /// Writes each of `values`, in order, as a `size`-byte write at `offset`
    /// (a batch of consumed ring entries), stopping right after the first
    /// write whose effect is not ``DeviceEffect/none``: no value after one
    /// that stops the VM is applied. The default calls ``write(offset:size:value:)``
    /// for each value; a device overrides it to take a run at once (a UART
    /// appends the bytes to its sink in one go).
    func writeBatch(offset: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult
}

/// What a device did with a batch of writes (``BusDevice/writeBatch(offset:size:values:)``).
public struct BatchWriteResult: Hashable, Sendable {
    /// How many values were applied, from the first; all of them unless one stopped the batch.
    public var applied: Int
    /// The effect of the last applied value (``DeviceEffect/none`` when the whole batch went through).
    public var effect: DeviceEffect
    /// Creates a result.
    public init(applied: Int, effect: DeviceEffect) { self.applied = applied; self.effect = effect }
}

extension BusDevice {
    /// By default a device offers no fast path.
    public func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? { nil }
    /// By default there is nothing to revoke.
    public func revokeFastPath(_ enableWord: FastPathEnableWord) {}

    /// By default a batch is one ``write(offset:size:value:)`` per value, stopping after a non-``DeviceEffect/none`` effect.
    public func writeBatch(offset: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult {
        for (i, v) in values.enumerated() {
            let e = write(offset: offset, size: size, value: v)
            if e != .none { return BatchWriteResult(applied: i + 1, effect: e) }
        }
        return BatchWriteResult(applied: values.count, effect: .none)
    }
}
