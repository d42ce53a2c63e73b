/// The kind of access a page walk checks permissions for.
public struct PageAccess: OptionSet, Hashable, Sendable, CustomStringConvertible {
    /// The raw bits.
    public let rawValue: UInt8
    /// Creates a set from raw bits.
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// A write access (needs R/W set at every level, or CR0.WP clear at CPL0).
    public static let write = PageAccess(rawValue: 1)
    /// A user-mode (CPL3) access (needs U/S set at every level).
    public static let user = PageAccess(rawValue: 2)
    /// An instruction fetch (needs XD clear at every level when EFER.NXE is set).
    public static let execute = PageAccess(rawValue: 4)

    /// e.g. `user write`.
    public var description: String {
        var parts: [String] = []
        if contains(.user) { parts.append("user") }
        if contains(.write) { parts.append("write") }
        if contains(.execute) { parts.append("execute") }
        return parts.isEmpty ? "supervisor read" : parts.joined(separator: " ")
    }
}

/// The result of translating a guest-virtual address.
public struct Translation: Hashable, Sendable {
    /// The guest-physical address the virtual address maps to.
    public var physical: GuestAddress
    /// The size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    public var pageSize: UInt64
    /// Whether every level allows writes.
    public var writable: Bool
    /// Whether every level allows user-mode access.
    public var user: Bool
    /// Whether no level forbids execution (XD clear everywhere).
    public var executable: Bool
}

/// The paging state a page walk needs, usually taken from the vCPU's special registers.
public struct PagingContext: Hashable, Sendable {
    /// CR3: the physical address of the PML4 (bits 51:12).
    public var cr3: UInt64
    /// CR0.WP: supervisor writes honour the R/W bit.
    public var writeProtect: Bool
    /// EFER.NXE: the XD bit is honoured.
    public var noExecuteEnabled: Bool
    /// The paging mode; only ``Mode/none`` and ``Mode/fourLevel`` can be walked.
    public var mode: Mode
    /// CR4.SMEP: supervisor instruction fetches from user pages fault.
    public var smep: Bool
    /// CR4.SMAP: supervisor data accesses to user pages fault (RFLAGS.AC is not considered).
    public var smap: Bool

    /// The x86 paging modes.
    public enum Mode: Hashable, Sendable {
        /// Paging off (CR0.PG clear): virtual = physical.
        case none
        /// 32-bit paging (CR4.PAE clear).
        case legacy32
        /// PAE paging without long mode.
        case pae
        /// 4-level paging (long mode).
        case fourLevel
        /// 5-level paging (CR4.LA57).
        case fiveLevel
    }

    /// Creates a context for 4-level paging (or another mode).
    public init(cr3: UInt64, writeProtect: Bool = true, noExecuteEnabled: Bool = true,
                mode: Mode = .fourLevel, smep: Bool = false, smap: Bool = false) {
        self.cr3 = cr3
        self.writeProtect = writeProtect
        self.noExecuteEnabled = noExecuteEnabled
        self.mode = mode
        self.smep = smep
        self.smap = smap
    }

    /// Takes the mode, CR3, CR0.WP, EFER.NXE, CR4.SMEP and CR4.SMAP from a vCPU's special registers.
    public init(_ sregs: SpecialRegisters) {
        let mode: Mode
        if sregs.cr0 & (1 << 31) == 0 { mode = .none }
        else if sregs.cr4 & (1 << 5) == 0 { mode = .legacy32 }
        else if sregs.efer & (1 << 10) == 0 { mode = .pae }
        else if sregs.cr4 & (1 << 12) != 0 { mode = .fiveLevel }
        else { mode = .fourLevel }
        self.init(cr3: sregs.cr3, writeProtect: sregs.cr0 & (1 << 16) != 0,
                  noExecuteEnabled: sregs.efer & (1 << 11) != 0, mode: mode,
                  smep: sregs.cr4 & (1 << 20) != 0, smap: sregs.cr4 & (1 << 21) != 0)
    }
}

extension GuestMemory {
    /// Translates a guest-virtual address through 4-level paging (4 KiB, 2 MiB
    /// and 1 GiB pages) and checks that the mapping allows `access`.
    ///
    /// The walk reads the guest's own page tables; it never writes them (no
    /// accessed/dirty bits are set).
    public func translate(_ virtual: UInt64, paging: PagingContext, access: PageAccess = []) throws(GuestMemoryError) -> Translation {
        switch paging.mode {
        case .none:
            return Translation(physical: GuestAddress(virtual), pageSize: 4096, writable: true, user: true, executable: true)
        case .fourLevel:
            break
        case .legacy32, .pae, .fiveLevel:
            throw .unsupportedPagingMode(paging.mode)
        }
        // Canonical: bits 63:47 all equal.
        let top = virtual >> 47
        guard top == 0 || top == 0x1ffff else { throw .nonCanonical(virtual: virtual) }
        let addrMask: UInt64 = 0x000f_ffff_ffff_f000
        var table = paging.cr3 & addrMask
        var writable = true, user = true, executable = true
        for level in stride(from: 4, through: 1, by: -1) {
            let index = (virtual >> (12 + 9 * UInt64(level - 1))) & 0x1ff
            let entry: UInt64 = try read(at: GuestAddress(table + index * 8))
            guard entry & 1 != 0 else { throw .pageNotPresent(virtual: virtual, level: level) }
            writable = writable && entry & 2 != 0
            user = user && entry & 4 != 0
            if paging.noExecuteEnabled && entry & (1 << 63) != 0 { executable = false }
            let large = entry & 0x80 != 0
            if large && level == 4 { throw .reservedBit(virtual: virtual, level: level) }
            if large || level == 1 {
                let pageSize: UInt64 = level == 3 ? 1 << 30 : level == 2 ? 1 << 21 : 1 << 12
                let frameMask = addrMask & ~(pageSize - 1)
                if large && (entry & (pageSize - 1) & addrMask & ~0x1000) != 0 {
                    // Bits between PAT (bit 12) and the frame must be zero in large pages.
                    throw .reservedBit(virtual: virtual, level: level)
                }
                let t = Translation(
                    physical: GuestAddress((entry & frameMask) | (virtual & (pageSize - 1))),
                    pageSize: pageSize, writable: writable, user: user, executable: executable)
                try check(t, virtual: virtual, access: access, paging: paging)
                return t
            }
            table = entry & addrMask
        }
        throw .pageNotPresent(virtual: virtual, level: 1)
    }

    private func check(_ t: Translation, virtual: UInt64, access: PageAccess, paging: PagingContext) throws(GuestMemoryError) {
        if access.contains(.user) && !t.user { throw .protectionViolation(virtual: virtual, access: access) }
        if access.contains(.write) && !t.writable && (access.contains(.user) || paging.writeProtect) {
            throw .protectionViolation(virtual: virtual, access: access)
        }
        if access.contains(.execute) && !t.executable { throw .protectionViolation(virtual: virtual, access: access) }
        // Supervisor access (no .user) to a user page: SMEP for fetches, SMAP for data.
        if !access.contains(.user) && t.user {
            if access.contains(.execute) ? paging.smep : paging.smap {
                throw .protectionViolation(virtual: virtual, access: access)
            }
        }
    }
}
