/// A doorbell device of the kind NVMe and virtio drivers talk to: the driver
/// stores a request to a doorbell register (one store per request), the device
/// writes a completion into a queue in guest RAM, and a status register counts
/// completions.
///
/// Registers (a 4 KiB MMIO page): `0x00` ID (`0x4C454244`, "DBEL"), `0x04`
/// STATUS (completions written, free-running), `0x08`/`0x0C` completion-queue
/// address (low/high), `0x10` queue entries (power of two ≤ 4096), `0x14`
/// CONTROL (1 = enabled), `0x18` ERROR (non-zero after a completion could not
/// be written), `0x40` DOORBELL (write a request value `v`). A completion is 8
/// bytes: u32 `v ^ 0x5A5A5A5A`, u32 sequence number (1-based), at
/// `queue[(seq - 1) % entries]`.
///
/// Every call is safe from any thread (one lock guards the registers). Fast
/// paths: a 4-byte DOORBELL write, when a ring feeds the register, is a
/// *synchronous* ring append (the completion lands in guest RAM, which the
/// guest reads without an exit), exact while the device is enabled with a
/// valid queue size; the guest keeps exiting for errors. A STATUS read of any
/// width (the device answers the count, zero-extended, at 1, 2, 4 and 8 bytes,
/// and the guest sees its low bytes), when the request offers a slot, is a
/// *shared-slot read* (the body loads the slot's low bytes), always exact: the
/// device writes the completion count into the slot under its lock at the
/// grant and after every completion (after the completion's RAM words), and
/// clears the read's enable word while a completion is being written (a guest
/// that saw it in RAM never reads the older count). The read is not
/// independent of pending ring entries: an entry not yet applied (the static-PV
/// twin posts without waiting) makes the guest's read exit, which applies it.
public final class DoorbellDevice: BusDevice, @unchecked Sendable {
    /// `doorbell`.
    public let name = "doorbell"
    /// The ID register's value.
    public static let id: UInt32 = 0x4C45_4244
    /// The DOORBELL register's offset.
    public static let doorbellOffset: UInt64 = 0x40
    /// The STATUS register's offset (completions written, free-running).
    public static let statusOffset: UInt64 = 0x04
    private let memory: GuestMemory
    private let lock = ConditionLock()
    private var queueAddress: UInt64 = 0
    private var entries: UInt32 = 0
    private var enabled = false
    private var completionCount: UInt32 = 0
    private var errorCode: UInt32 = 0
    private var grants = FastPathGrants()

    /// Completions written so far.
    public var completions: UInt32 { lock.withLock { completionCount } }
    /// Non-zero when a completion could not be written (bad queue address or size).
    public var error: UInt32 { lock.withLock { errorCode } }

    /// A doorbell device that writes completions into `memory`.
    public init(memory: GuestMemory) { self.memory = memory }

    /// Reads a register.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        lock.lock(); defer { lock.unlock() }
        switch offset {
        case 0x00: return UInt64(DoorbellDevice.id)
        case DoorbellDevice.statusOffset: return UInt64(completionCount)
        case 0x08: return queueAddress & 0xffff_ffff
        case 0x0c: return queueAddress >> 32
        case 0x10: return UInt64(entries)
        case 0x14: return enabled ? 1 : 0
        case 0x18: return UInt64(errorCode)
        default: return 0
        }
    }

    /// Writes a register; a DOORBELL write produces a completion.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        let v = UInt32(truncatingIfNeeded: value)
        lock.lock(); defer { lock.unlock() }
        switch offset {
        case 0x08: queueAddress = (queueAddress & ~0xffff_ffff) | UInt64(v)
        case 0x0c: queueAddress = (queueAddress & 0xffff_ffff) | (UInt64(v) << 32)
        case 0x10: entries = v
        case 0x14: enabled = v & 1 != 0
        case DoorbellDevice.doorbellOffset:
            grants.clearSlotReads()
            complete(v)
        default: break
        }
        if !grants.isEmpty {
            grants.storeSlots { _ in UInt64(completionCount) }
            let exact = doorbellIsExact
            grants.refresh { $0.direction == .read || exact }
        }
        return .none
    }

    /// Whether the queue is usable (lock held).
    private var queueIsValid: Bool { enabled && entries > 0 && entries <= 4096 && entries & (entries - 1) == 0 }
    /// Whether a DOORBELL write may come from a ring (lock held).
    private var doorbellIsExact: Bool { queueIsValid }

    private func complete(_ request: UInt32) {
        guard queueIsValid else { errorCode = 1; return }
        let index = UInt64(completionCount & (entries - 1))
        guard let at = GuestAddress(queueAddress).adding(index * 8), let seqAt = at.adding(4) else { errorCode = 2; return }
        do {
            try memory.dmaWrite(request ^ 0x5A5A_5A5A, at: at)
            try memory.dmaWrite(completionCount &+ 1, at: seqAt)
        } catch {
            errorCode = 2
            return
        }
        completionCount &+= 1
    }

    /// Grants the 4-byte DOORBELL write as a synchronous ring append when `request.ring` names a ring,
    /// and the STATUS read (any width) as a shared-slot read when `request.slot` offers a slot.
    public func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        switch (request.offset, request.direction) {
        case (DoorbellDevice.doorbellOffset, .write):
            // The ring carries 4-byte requests; a narrower store completes with fewer bits and exits.
            guard request.size == 4, let ring = request.ring else { return nil }
            let d = FastPathDescription(.ringAppend(ring: ring, mode: .synchronous), for: request)
            lock.withLock { grants.add(d, word: enableWord, exact: doorbellIsExact) }
            return d
        case (DoorbellDevice.statusOffset, .read):
            // `read` answers the count at every width (the bus hands the guest its low `size` bytes): the
            // slot's low bytes, little-endian, are the same value.
            guard [1, 2, 4, 8].contains(request.size), let slot = request.slot else { return nil }
            let d = FastPathDescription(.sharedSlotRead(slot: slot.index), for: request)
            lock.withLock { grants.add(d, word: enableWord, slot: slot, value: UInt64(completionCount), exact: true) }
            return d
        default:
            return nil
        }
    }

    /// Forgets a grant and clears its word.
    public func revokeFastPath(_ enableWord: FastPathEnableWord) {
        lock.withLock { grants.remove(enableWord) }
    }
}
