/// Where the x86 platform puts things in guest-physical memory.
///
/// ```
/// 0x000500  GDT                      0x007000  hvm_start_info
/// 0x001000  PML4, PDPT, 4 PDs        0x007100  memory map
///           (identity map of 4 GiB)  0x008000  command line (≤ 28 KiB)
/// 0x080000  initial stack top (long-mode entries)
/// 0x100000  kernel image (RAM up to 0xE00000)
/// 0xE00000  paravirtual area (reserved, 2 MiB): rings 0xE00000, DMP implant 0xF00000
/// 0x1000000 RAM up to the memory size
/// ```
public enum X86Layout {
    /// The GDT the platform sets up for entry.
    public static let gdt: UInt64 = 0x500
    /// The PML4 of the identity map used for long-mode entries.
    public static let pml4: UInt64 = 0x1000
    /// `struct hvm_start_info` for PVH entries.
    public static let startInfo: UInt64 = 0x7000
    /// The PVH memory map.
    public static let memoryMap: UInt64 = 0x7100
    /// The kernel command line (NUL-terminated).
    public static let commandLine: UInt64 = 0x8000
    /// The longest command line accepted, including the NUL.
    public static let commandLineMaximum = 0x7000
    /// The stack pointer for long-mode (non-PVH) entries; vCPU `n` starts at `initialStack - n * 0x1000`.
    public static let initialStack: UInt64 = 0x80000
    /// How many vCPUs get a boot stack above the platform tables (0x10000).
    public static let maximumLongModeVCPUs = Int((initialStack - 0x10000) / 0x1000)
    /// The lowest address a kernel segment may load at.
    public static let kernelMinimum: UInt64 = 0x100000
    /// The reserved paravirtual area (ring device, DMP implant): never RAM in the memory map.
    public static let paravirtualArea = GuestRange(start: GuestAddress(0xE0_0000), size: 0x20_0000)
    /// The part of ``paravirtualArea`` the paravirtual rings live in (its lower 1 MiB).
    public static let ringArea = GuestRange(start: GuestAddress(0xE0_0000), size: 0x10_0000)
    /// The part of ``paravirtualArea`` left to a DMP implant (its upper 1 MiB).
    public static let implantArea = GuestRange(start: GuestAddress(0xF0_0000), size: 0x10_0000)
    /// The smallest guest memory the platform accepts.
    public static let minimumMemory: UInt64 = 32 << 20

    /// The memory map the guest is given: (range, type) with type 1 = RAM, 2 = reserved.
    /// `ram` are the VM's RAM ranges (``VMConfiguration/ramRanges``); the first starts at 0.
    public static func memoryMap(ram: [GuestRange]) -> [(GuestRange, UInt32)] {
        let memorySize = ram.first?.size ?? 0
        var m: [(GuestRange, UInt32)] = [
            (GuestRange(start: GuestAddress(0), size: 0x9fc00), 1),
            (GuestRange(start: GuestAddress(0x9fc00), size: 0x100000 - 0x9fc00), 2),
            (GuestRange(start: GuestAddress(0x100000), size: paravirtualArea.start.rawValue - 0x100000), 1),
            (paravirtualArea, 2),
        ]
        let top = paravirtualArea.start.rawValue + paravirtualArea.size
        if memorySize > top { m.append((GuestRange(start: GuestAddress(top), size: memorySize - top), 1)) }
        for r in ram.dropFirst() { m.append((r, 1)) }
        return m
    }
}
