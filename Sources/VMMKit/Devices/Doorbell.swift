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
public final class DoorbellDevice: BusDevice {
    /// `doorbell`.
    public let name = "doorbell"
    /// The ID register's value.
    public static let id: UInt32 = 0x4C45_4244
    /// The DOORBELL register's offset.
    public static let doorbellOffset: UInt64 = 0x40
    private let memory: GuestMemory
    private var queueAddress: UInt64 = 0
    private var entries: UInt32 = 0
    private var enabled = false
    /// Completions written so far.
    public private(set) var completions: UInt32 = 0
    /// Non-zero when a completion could not be written (bad queue address or size).
    public private(set) var error: UInt32 = 0

    /// A doorbell device that writes completions into `memory`.
    public init(memory: GuestMemory) { self.memory = memory }

    /// Reads a register.
    public func read(offset: UInt64, size: Int) -> UInt64 {
        switch offset {
        case 0x00: UInt64(DoorbellDevice.id)
        case 0x04: UInt64(completions)
        case 0x08: queueAddress & 0xffff_ffff
        case 0x0c: queueAddress >> 32
        case 0x10: UInt64(entries)
        case 0x14: enabled ? 1 : 0
        case 0x18: UInt64(error)
        default: 0
        }
    }

    /// Writes a register; a DOORBELL write produces a completion.
    public func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect {
        let v = UInt32(truncatingIfNeeded: value)
        switch offset {
        case 0x08: queueAddress = (queueAddress & ~0xffff_ffff) | UInt64(v)
        case 0x0c: queueAddress = (queueAddress & 0xffff_ffff) | (UInt64(v) << 32)
        case 0x10: entries = v
        case 0x14: enabled = v & 1 != 0
        case DoorbellDevice.doorbellOffset: complete(v)
        default: break
        }
        return .none
    }

    private func complete(_ request: UInt32) {
        guard enabled, entries > 0, entries <= 4096, entries & (entries - 1) == 0 else { error = 1; return }
        let index = UInt64(completions & (entries - 1))
        guard let at = GuestAddress(queueAddress).adding(index * 8) else { error = 2; return }
        do {
            try memory.dmaWrite(request ^ 0x5A5A_5A5A, at: at)
            try memory.dmaWrite(completions &+ 1, at: GuestAddress(at.rawValue + 4))
        } catch {
            self.error = 2
            return
        }
        completions &+= 1
    }

    /// DOORBELL writes may go through a ring while the device is enabled.
    public func fastPath(offset: UInt64, size: Int, direction: AccessDirection) -> FastPathDescription? {
        guard offset == DoorbellDevice.doorbellOffset, direction == .write else { return nil }
        return FastPathDescription(kind: .ringAppend, offset: offset, size: size, direction: .write, enabled: enabled)
    }
}
