/// What was loaded and how the vCPUs will enter it.
public struct LoadedImage: Sendable {
    /// How the vCPUs enter the image.
    public enum EntryMode: Hashable, Sendable {
        /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
        case pvh(UInt32)
        /// 64-bit long mode with the platform's identity map, RSP = ``X86Layout/initialStack``.
        case long64(UInt64)
    }
    /// The entry mode and address.
    public var entry: EntryMode
    /// The guest-physical ranges the image occupies.
    public var segments: [GuestRange]
    /// The image's symbols (empty for flat binaries and stripped images).
    public var symbols: SymbolTable
    /// Where the image's sections (code, read-only data, writable data) lie, from its ELF section headers;
    /// `nil` for flat binaries and images without section headers.
    package var layout: ImageLayout?
}
