/// An allocated section of a loaded image (ELF `SHF_ALLOC`), placed in guest-physical memory.
package struct ImageSection: Hashable, Sendable {
    /// The section's name (`.text`, `.rodata`, `.data`, ...), from the section-header string table; empty when it has none.
    package var name: String
    /// Where the section lies in guest-physical memory (its `sh_addr` through the segment that loads it).
    package var range: GuestRange
    /// Whether the guest may write it (`SHF_WRITE`).
    package var writable: Bool
    /// Whether it holds code (`SHF_EXECINSTR`).
    package var executable: Bool

    /// Creates a section record.
    package init(name: String, range: GuestRange, writable: Bool, executable: Bool) {
        self.name = name; self.range = range; self.writable = writable; self.executable = executable
    }
}

/// What an image's section headers say about its guest-physical layout: which bytes of the loaded segments
/// hold code, read-only data or writable data. DMP's guard rules use it (a page that holds writable data is never
/// guarded; one that holds only code and read-only data may be).
package struct ImageLayout: Hashable, Sendable {
    /// The allocated sections, in guest-physical memory.
    package var sections: [ImageSection]
    /// The guest-physical ranges the image's loaded segments occupy (`p_paddr`, `p_memsz`).
    package var segments: [GuestRange]
    /// The virtual address each of ``segments`` is linked at (`p_vaddr`), in the same order: where the guest runs
    /// the image's code when it maps it elsewhere than at its physical address (a higher-half kernel).
    package var virtualAddresses: [UInt64]

    /// Creates a layout; `virtualAddresses` default to the segments' physical addresses (an identity-linked image).
    package init(sections: [ImageSection], segments: [GuestRange], virtualAddresses: [UInt64]? = nil) {
        self.sections = sections; self.segments = segments
        self.virtualAddresses = virtualAddresses ?? segments.map(\.start.rawValue)
    }

    /// The layout of `elf` as loaded: each allocated section placed through the loaded segment whose virtual range
    /// holds it (`nil` when the image has no section headers, or an allocated section lies in no loaded segment).
    package init?(_ elf: ELFImage) {
        guard let headers = elf.sections else { return nil }
        var placed: [ImageSection] = []
        for s in headers where s.size > 0 {
            guard let seg = elf.segments.first(where: { s.address >= $0.virtualAddress && s.address - $0.virtualAddress < $0.memorySize
                                                        && s.size <= $0.memorySize - (s.address - $0.virtualAddress) }) else {
                return nil
            }
            placed.append(ImageSection(name: s.name,
                                       range: GuestRange(start: GuestAddress(seg.physicalAddress + (s.address - seg.virtualAddress)), size: s.size),
                                       writable: s.writable, executable: s.executable))
        }
        self.init(sections: placed, segments: elf.segments.map { GuestRange(start: GuestAddress($0.physicalAddress), size: $0.memorySize) },
                  virtualAddresses: elf.segments.map(\.virtualAddress))
    }
}
