/// How to build a ``VirtualMachine``.
public struct VMConfiguration: Sendable {
    /// Guest RAM size in bytes, mapped at guest-physical 0 (page aligned, at least 2 MiB).
    public var memorySize: UInt64 = 256 << 20
    /// The number of vCPUs.
    public var vcpuCount: Int = 1
    /// Extra memory regions: guest-physical range and whether the slot is read-only
    /// (guest writes to a read-only slot exit as MMIO writes).
    public var extraRegions: [(range: GuestRange, readOnly: Bool)] = []
    /// Stop the VM with ``VMError/unclaimedAccess(space:address:direction:vcpu:rip:)`` when the
    /// guest accesses a port or address no device claims (default: PC convention, reads all ones).
    public var strict: Bool = false
    /// Count exits per site (RIP and access), for profiles. Costs a hash-table update per exit.
    public var collectSiteStatistics: Bool = false
    /// Create the in-kernel interrupt controllers (`KVM_CREATE_IRQCHIP`) before the vCPUs.
    public var inKernelIRQChip: Bool = false
    /// Deliver guest accesses to MSRs KVM does not know as ``VMExit/msrRead(index:)`` and
    /// ``VMExit/msrWrite(index:value:)`` exits (`KVM_CAP_X86_USER_SPACE_MSR`); unhandled ones get #GP.
    public var userSpaceMSRExits: Bool = false

    /// The size of the memory slots RAM is carved into at creation (a power of
    /// two; coarsened for very large RAM, see ``MemorySlots``). Small slots make
    /// guarding a page at run time cheap: on shadow-paging hosts a slot delete
    /// drops the guest's mappings of that slot. 0 registers one slot per region.
    public var slotGranularity: UInt64 = 2 << 20
    /// Log the guest's writes to RAM (`KVM_MEM_LOG_DIRTY_PAGES`); read them with ``MemorySlots/dirtyPages()``.
    public var logDirtyPages: Bool = false
    /// Host CPUs every thread the VM starts runs on: its vCPU threads, its service threads (the ring
    /// poller) and its timer (nil: wherever the host schedules them). ``VirtualMachine/start()`` throws when
    /// the host refuses the set. For tests that put the vCPU and the ring poller on one CPU.
    package var hostCPUs: [Int]?

    /// Where RAM ends below 4 GiB: `[lowMemoryLimit, 4 GiB)` is left for MMIO
    /// (the doorbell, the LAPIC and IOAPIC, the TSS pages), and RAM beyond it continues at 4 GiB.
    public static let lowMemoryLimit: UInt64 = 0xC000_0000

    /// The guest-physical ranges of RAM: `[0, min(size, 3 GiB))`, then the rest from 4 GiB.
    public var ramRanges: [GuestRange] {
        let low = min(memorySize, VMConfiguration.lowMemoryLimit)
        var r = [GuestRange(start: GuestAddress(0), size: low)]
        if memorySize > low { r.append(GuestRange(start: GuestAddress(1 << 32), size: memorySize - low)) }
        return r
    }

    /// The default configuration: 256 MiB, one vCPU.
    public init() {}

    /// A configuration with the given memory size and vCPU count.
    public init(memorySize: UInt64, vcpuCount: Int = 1) {
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
    }
}
