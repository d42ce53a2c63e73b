/// A guest image to boot.
public enum BootImage: Sendable {
    /// An ELF64 image: entered through PVH when it has the `XEN_ELFNOTE_PHYS32_ENTRY`
    /// note (as QEMU does), else at `e_entry` in 64-bit long mode.
    case elf([UInt8])
    /// A flat binary copied to `loadAddress` and entered in 64-bit long mode at `entry` (default: `loadAddress`).
    case flat([UInt8], loadAddress: UInt64 = 0x100000, entry: UInt64? = nil)
}
