import Synchronization
import VMMKit

/// A sample-collecting sensor block, this package's own device: the guest
/// enables it, polls STATUS until READY, writes samples to DATA, and reads
/// back how many samples the block took (COUNT) and a hash of them (HASH).
///
/// Registers (4-byte accesses, a 4 KiB MMIO page, offsets from its start):
///
/// | offset | register | access |
/// |---|---|---|
/// | `0x00` | ID, `0x534E5350` ("PSNS") | read |
/// | `0x04` | STATUS: bit 0 READY (the block is enabled) | read |
/// | `0x08` | CONTROL: bit 0 enable; writing it also resets COUNT and HASH when bit 1 is set | read/write |
/// | `0x0C` | DATA: a sample; taken (COUNT + 1, HASH updated) while enabled, dropped otherwise | write |
/// | `0x10` | COUNT: samples taken | read |
/// | `0x14` | HASH: FNV-1a 32 over the samples taken, in order, each as 4 little-endian bytes | read |
/// | `0x18` | DROPPED: samples written while disabled | read |
///
/// Reads have no side effects; other offsets and widths read 0 and ignore writes.
///
/// Fast paths (``grantFastPath(_:enableWord:)``), each exact under the lock that guards the
/// registers:
/// - STATUS read, 4 bytes: `.constantRead(READY)`, its enable word set only while
///   the block is enabled; independent of pending ring entries once ``setRingDrain(_:)``
///   is set (see ``write(offset:size:value:)`` for why it needs the drain).
/// - DATA write, 4 bytes, when a ring feeds DATA: an *asynchronous* ring append (a
///   sample's effect reaches the guest only through reads of COUNT and HASH, which
///   exit or are served from a slot the block updates as it applies the entry),
///   its enable word set only while the block is enabled.
/// - COUNT read, 4 bytes, when offered a slot: `.sharedSlotRead`, the slot rewritten
///   after every change of COUNT; *not* independent of pending ring entries (a
///   sample still in the ring has not been counted yet, so a stub serves the read
///   from the slot only while the rings are empty).
public final class SensorBlock: BusDevice, @unchecked Sendable {
    /// `sensor`.
    public let name = "sensor"

    /// The ID register's value ("PSNS").
    public static let id: UInt32 = 0x534E_5350
    /// STATUS's offset.
    public static let statusOffset: UInt64 = 0x04
    /// CONTROL's offset.
    public static let controlOffset: UInt64 = 0x08
    /// DATA's offset.
    public static let dataOffset: UInt64 = 0x0C
    /// COUNT's offset.
    public static let countOffset: UInt64 = 0x10
    /// HASH's offset.
    public static let hashOffset: UInt64 = 0x14
    /// DROPPED's offset.
    public static let droppedOffset: UInt64 = 0x18
    /// STATUS's READY bit.
    public static let ready: UInt32 = 1

    private struct State {
        var enabled = false
        var count: UInt32 = 0
        var hash: UInt32 = 0x811C_9DC5
        var dropped: UInt32 = 0
        var grants = FastPathGrants()
        /// CONTROL writes between clearing the words and changing CONTROL (their drain runs unlocked): the
        /// STATUS and DATA words stay clear meanwhile.
        var suspended = 0
        /// Applies every ring entry published so far.
        var drain: (@Sendable () -> Void)?

        mutating func take(_ sample: UInt32) {
            guard enabled else { dropped &+= 1; return }
            count &+= 1
            var s = sample
            for _ in 0..<4 {
                hash = (hash ^ (s & 0xff)) &* 0x0100_0193
                s >>= 8
            }
        }

        /// After every change: slots first, then the words (the contract's order).
        func publish() {
            guard !grants.isEmpty else { return }
            grants.storeSlots { _ in UInt64(count) }
            let enabled = enabled && suspended == 0
            grants.refresh { d in d.offset == SensorBlock.countOffset || enabled }
        }
    }

    private let state = Mutex(State())

    /// A disabled block with no samples.
    public init() {}

    /// Samples taken so far.
    public var count: UInt32 { state.withLock { $0.count } }
    /// FNV-1a 32 over the samples taken so far.
    public var hash: UInt32 { state.withLock { $0.hash } }

    /// Reads a register (4 bytes; other widths read 0).
    public func read(offset: UInt64, size: Int) -> UInt64 {
        guard size == 4 else { return 0 }
        return state.withLock { s in
            switch offset {
            case 0x00: UInt64(SensorBlock.id)
            case SensorBlock.statusOffset: s.enabled ? UInt64(SensorBlock.ready) : 0
            case SensorBlock.controlOffset: s.enabled ? 1 : 0
            case SensorBlock.countOffset: UInt64(s.count)
            case SensorBlock.hashOffset: UInt64(s.hash)
            case SensorBlock.droppedOffset: UInt64(s.dropped)
            default: 0
            }
        }
    }

    /// Sets what applies every ring entry published so far (the ring device's `drain()`; it must not
    /// be called with the block's lock held, and the block never does). With it, STATUS is declared
    /// independent of pending ring entries. CONTROL must not be a ring's target: the drain runs inside
    /// CONTROL writes, and a consumer applying one would wait for itself.
    public func setRingDrain(_ drain: @escaping @Sendable () -> Void) {
        state.withLock { $0.drain = drain }
    }

    /// Writes a register (4 bytes; other widths are ignored).
    ///
    /// A CONTROL write first clears the STATUS and DATA words, applies the ring entries producers
    /// published while they were set (with the lock released), and only then changes CONTROL. Without
    /// that, a guest could append a sample, read READY from the constant, and have its sample dropped by
    /// a disable another vCPU made after that read: its sample would take effect after a read it
    /// preceded. An entry appended after the words went clear comes from a stub that looked just
    /// before; its next STATUS read finds the word clear and exits.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        guard size == 4 else { return .none }
        let v = UInt32(truncatingIfNeeded: value)
        if offset == SensorBlock.controlOffset, let drain = state.withLock({ s -> (@Sendable () -> Void)? in
            guard let d = s.drain, !s.grants.isEmpty else { return nil }
            s.suspended += 1
            s.publish()
            return d
        }) {
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            drain()
            state.withLock { $0.suspended -= 1 }
        }
        state.withLock { s in
            switch offset {
            case SensorBlock.controlOffset:
                s.enabled = v & 1 != 0
                if v & 2 != 0 { s.count = 0; s.hash = 0x811C_9DC5; s.dropped = 0 }
            case SensorBlock.dataOffset:
                s.take(v)
            default:
                return
            }
            s.publish()
        }
        return .none
    }

    /// Takes a run of DATA samples (ring entries) under one lock.
    public func writeBatch(offset: UInt64, size: Int, values: UnsafeBufferPointer<UInt64>) -> BatchWriteResult {
        guard offset == SensorBlock.dataOffset, size == 4 else {
            for v in values { _ = write(offset: offset, size: size, value: v) }
            return BatchWriteResult(applied: values.count, effect: .none)
        }
        state.withLock { s in
            for v in values { s.take(UInt32(truncatingIfNeeded: v)) }
            s.publish()
        }
        return BatchWriteResult(applied: values.count, effect: .none)
    }

    /// Grants the STATUS read, the DATA write (with a ring) and the COUNT read (with a slot); nothing else.
    public func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        guard request.size == 4 else { return nil }
        return state.withLock { s -> FastPathDescription? in
            switch (request.offset, request.direction) {
            case (SensorBlock.statusOffset, .read):
                let d = FastPathDescription(.constantRead(UInt64(SensorBlock.ready)), for: request,
                                            independentOfPendingRingEntries: s.drain != nil)
                s.grants.add(d, word: enableWord, exact: s.enabled && s.suspended == 0)
                return d
            case (SensorBlock.dataOffset, .write):
                guard let ring = request.ring else { return nil }
                let d = FastPathDescription(.ringAppend(ring: ring, mode: .asynchronous), for: request)
                s.grants.add(d, word: enableWord, exact: s.enabled && s.suspended == 0)
                return d
            case (SensorBlock.countOffset, .read):
                guard let slot = request.slot else { return nil }
                let d = FastPathDescription(.sharedSlotRead(slot: slot.index), for: request)
                s.grants.add(d, word: enableWord, slot: slot, value: UInt64(s.count), exact: true)
                return d
            default:
                return nil
            }
        }
    }

    /// Forgets a grant and clears its word.
    public func revokeFastPath(_ enableWord: FastPathEnableWord) {
        state.withLock { $0.grants.remove(enableWord) }
    }
}
