import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A mock VM: records memory slots and creates ``MockVCPU``s.
public final class MockVM: VMBackend, @unchecked Sendable {
    private let log: MockCallLog
    private let cpuid: [CPUIDEntry]
    private let capabilities: [Int32: Int32]
    private let state = Locked<(slots: [UInt32: MemorySlot], vcpus: [MockVCPU], zones: [CoalescedZone], irqs: [UInt32: Bool])>(([:], [], [], [:]))
    private let memoryState = Locked<(deleted: [MemorySlot], dirty: Set<UInt64>, caps: [(UInt32, [UInt64])])>(([], [], []))

    init(hypervisor: MockHypervisor) {
        // Keep what the VM needs, not the hypervisor: a VM may outlive it.
        log = hypervisor.log
        cpuid = hypervisor.supportedCPUID
        capabilities = hypervisor.capabilities
    }

    /// The slots deleted so far (as they were before the delete), oldest first.
    public var deletedSlots: [MemorySlot] { memoryState.withLock { $0.deleted } }
    /// The capabilities enabled through ``enableCapability(_:args:)``, in order.
    public var enabledCapabilities: [(capability: UInt32, args: [UInt64])] { memoryState.withLock { $0.caps.map { ($0.0, $0.1) } } }

    /// Marks the page holding `address` dirty, as a guest write would (read back by ``dirtyLog(slot:pageCount:)``).
    public func markDirty(_ address: GuestAddress) { memoryState.withLock { _ = $0.dirty.insert(address.rawValue & ~0xfff) } }

    /// Runs a guest store as KVM would (see ``MockStep/guestStore(_:size:value:)``): writes the
    /// fragments a writable slot backs, returns the MMIO write exits of the others.
    func guestStore(_ address: GuestAddress, size: Int, value: UInt64) -> [MMIOAccess] {
        let n = max(1, min(size, 8))
        var exits: [MMIOAccess] = []
        var done = 0
        while done < n {
            let a = address.rawValue &+ UInt64(done)
            let inPage = Int(min(UInt64(n - done), 0x1000 - (a & 0xfff)))
            let v = done < 8 ? value >> (8 * UInt64(done)) : 0
            let slot = state.withLock { s in s.slots.values.first { $0.range.contains(GuestAddress(a), length: UInt64(inPage)) } }
            if let slot, !slot.flags.contains(.readOnly), let host = slot.host, let off = GuestAddress(a).offset(from: slot.range.start) {
                for i in 0..<inPage {
                    (host + Int(off) + i).storeBytes(of: UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))), as: UInt8.self)
                }
                if slot.flags.contains(.logDirtyPages) { markDirty(GuestAddress(a)) }
            } else {
                let mask: UInt64 = inPage == 8 ? .max : (1 << (8 * UInt64(inPage))) - 1
                exits.append(MMIOAccess(address: GuestAddress(a), size: UInt8(inPage), direction: .write, value: v & mask))
            }
            done += inPage
        }
        return exits
    }

    /// The memory slots, by slot number.
    public var slots: [UInt32: MemorySlot] { state.withLock { $0.slots } }
    /// The vCPUs.
    public var vcpus: [MockVCPU] { state.withLock { $0.vcpus } }
    /// Registered coalesced zones.
    public var coalescedZones: [CoalescedZone] { state.withLock { $0.zones } }
    /// IRQ line levels set through ``setIRQLine(_:level:)``.
    public var irqLevels: [UInt32: Bool] { state.withLock { $0.irqs } }

    /// Records the slot (size 0 deletes it), refusing what KVM refuses: a slot
    /// that overlaps another (`EEXIST`); a live slot's size, address or
    /// read-only flag changed in place, a delete of a slot that does not
    /// exist, an unaligned slot or a slot number past `KVM_CAP_NR_MEMSLOTS` (`EINVAL`).
    public func setUserMemoryRegion(_ slot: MemorySlot) throws(BackendError) {
        let verb = slot.range.size == 0 ? "delete" : "set"
        try log.record(.setUserMemoryRegion, "\(verb) slot \(slot.slot) \(slot.range) flags \(slot.flags.rawValue)")
        let limit = capabilities[Int32(KVMCapability.nrMemslots)] ?? 32
        let refusal: Errno? = state.withLock { s in
            guard Int(slot.slot) < Int(limit) else { return .invalidArgument }
            if slot.range.size == 0 {
                guard let old = s.slots.removeValue(forKey: slot.slot) else { return .invalidArgument }
                memoryState.withLock { $0.deleted.append(old) }
                return nil
            }
            guard slot.range.start.rawValue & 0xfff == 0, slot.range.size & 0xfff == 0, slot.range.end != nil else { return .invalidArgument }
            if let old = s.slots[slot.slot],
               old.range != slot.range || old.flags.contains(.readOnly) != slot.flags.contains(.readOnly) { return .invalidArgument }
            if s.slots.values.contains(where: { $0.slot != slot.slot && $0.range.overlaps(slot.range) }) { return .exists }
            s.slots[slot.slot] = slot
            return nil
        }
        if let refusal { throw BackendError(MockOperation.setUserMemoryRegion.rawValue, errno: refusal, detail: "refused by the mock backend, as KVM does") }
    }

    /// Creates a mock vCPU.
    public func createVCPU(id: Int) throws(BackendError) -> any VCPUBackend {
        try log.record(.createVCPU, "\(id)")
        let v = MockVCPU(id: id, log: log, vm: self)
        state.withLock { $0.vcpus.append(v) }
        return v
    }

    /// Returns the hypervisor's ``MockHypervisor/supportedCPUID`` as it was when the VM was created.
    public func supportedCPUID() throws(BackendError) -> [CPUIDEntry] {
        try log.record(.getSupportedCPUID)
        return cpuid
    }
    /// The hypervisor's ``MockHypervisor/capabilities`` entry, else 1 (present).
    public func checkExtension(_ capability: Int32) -> Int32 { capabilities[capability] ?? 1 }
    /// The slot's pages marked dirty (``markDirty(_:)``, guest stores into a dirty-logging slot), then cleared.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws(BackendError) -> [UInt64] {
        try log.record(.getDirtyLog, "slot \(slot)")
        guard let s = state.withLock({ $0.slots[slot] }) else {
            throw BackendError(MockOperation.getDirtyLog.rawValue, errno: .invalidArgument, detail: "no memory slot \(slot)")
        }
        let pages = max(pageCount, Int(s.range.size / 4096))
        var bitmap = [UInt64](repeating: 0, count: max(1, (pages + 63) / 64))
        memoryState.withLock { m in
            for p in m.dirty where s.range.contains(GuestAddress(p)) {
                let i = Int((p - s.range.start.rawValue) / 4096)
                bitmap[i / 64] |= 1 << UInt64(i % 64)
                m.dirty.remove(p)
            }
        }
        return bitmap
    }
    /// Records the call.
    public func setTSSAddress(_ address: UInt64) throws(BackendError) { try log.record(.setTSSAddress, "0x" + String(address, radix: 16)) }
    /// Records the call.
    public func createIRQChip() throws(BackendError) { try log.record(.createIRQChip) }
    /// Records the level.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(BackendError) {
        try log.record(.irqLine, "\(irq)=\(level ? 1 : 0)")
        state.withLock { $0.irqs[irq] = level }
    }
    /// Records the call.
    public func registerIRQFD(fd: Int32, gsi: UInt32) throws(BackendError) { try log.record(.irqfd, "fd \(fd) gsi \(gsi)") }
    /// Records the call.
    public func registerIOEventFD(_ event: IOEventFD) throws(BackendError) { try log.record(.ioeventfd, "0x" + String(event.address, radix: 16)) }
    /// Records the zone.
    public func registerCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try log.record(.registerCoalescedMMIO, "0x" + String(zone.address, radix: 16))
        state.withLock { $0.zones.append(zone) }
    }
    /// Records the capability.
    public func enableCapability(_ capability: UInt32, args: [UInt64]) throws(BackendError) {
        try log.record(.enableCapability, "\(capability) \(args)")
        memoryState.withLock { $0.caps.append((capability, args)) }
    }
    /// Removes the zone.
    public func unregisterCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try log.record(.unregisterCoalescedMMIO, "0x" + String(zone.address, radix: 16))
        state.withLock { $0.zones.removeAll { $0 == zone } }
    }
}
