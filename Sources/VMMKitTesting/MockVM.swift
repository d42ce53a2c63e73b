import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A mock VM: records memory slots and creates ``MockVCPU``s.
public final class MockVM: VMBackend, @unchecked Sendable {
    private let log: MockCallLog
    private let cpuid: [CPUIDEntry]
    private let state = Locked<(slots: [UInt32: MemorySlot], vcpus: [MockVCPU], zones: [CoalescedZone], irqs: [UInt32: Bool])>(([:], [], [], [:]))

    init(hypervisor: MockHypervisor) {
        // Keep what the VM needs, not the hypervisor: a VM may outlive it.
        log = hypervisor.log
        cpuid = hypervisor.supportedCPUID
    }

    /// The memory slots, by slot number.
    public var slots: [UInt32: MemorySlot] { state.withLock { $0.slots } }
    /// The vCPUs.
    public var vcpus: [MockVCPU] { state.withLock { $0.vcpus } }
    /// Registered coalesced zones.
    public var coalescedZones: [CoalescedZone] { state.withLock { $0.zones } }
    /// IRQ line levels set through ``setIRQLine(_:level:)``.
    public var irqLevels: [UInt32: Bool] { state.withLock { $0.irqs } }

    /// Records the slot (size 0 deletes it).
    public func setUserMemoryRegion(_ slot: MemorySlot) throws(BackendError) {
        try log.record(.setUserMemoryRegion, "slot \(slot.slot) \(slot.range) flags \(slot.flags.rawValue)")
        state.withLock { s in if slot.range.size == 0 { s.slots[slot.slot] = nil } else { s.slots[slot.slot] = slot } }
    }

    /// Creates a mock vCPU.
    public func createVCPU(id: Int) throws(BackendError) -> any VCPUBackend {
        try log.record(.createVCPU, "\(id)")
        let v = MockVCPU(id: id, log: log)
        state.withLock { $0.vcpus.append(v) }
        return v
    }

    /// Returns the hypervisor's ``MockHypervisor/supportedCPUID`` as it was when the VM was created.
    public func supportedCPUID() throws(BackendError) -> [CPUIDEntry] {
        try log.record(.getSupportedCPUID)
        return cpuid
    }
    /// Every capability is reported present (1).
    public func checkExtension(_ capability: Int32) -> Int32 { 1 }
    /// An all-clear bitmap.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws(BackendError) -> [UInt64] {
        try log.record(.getDirtyLog, "slot \(slot)")
        return Array(repeating: 0, count: max(1, (pageCount + 63) / 64))
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
    }
    /// Removes the zone.
    public func unregisterCoalescedZone(_ zone: CoalescedZone) throws(BackendError) {
        try log.record(.unregisterCoalescedMMIO, "0x" + String(zone.address, radix: 16))
        state.withLock { $0.zones.removeAll { $0 == zone } }
    }
}
