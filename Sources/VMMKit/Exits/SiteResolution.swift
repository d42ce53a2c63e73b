/// Where RIP stood at an exit relative to the exiting instruction, found by
/// bracketing: completing the access and comparing RIP before and after.
public enum RIPPosition: Hashable, Sendable {
    /// RIP was on the instruction: it starts at the exit's RIP and is `length`
    /// bytes long (RIP moved by that much when the access completed).
    case onInstruction(length: Int)
    /// RIP was already past the instruction: it did not move when the access
    /// completed, so the instruction ends at the exit's RIP.
    case pastInstruction
    /// Not known: the exit had no access to complete (a halt, a debug exit),
    /// the completion was cut short by a stop, or RIP moved by more than an
    /// instruction's 15 bytes.
    case unknown
}

/// An exit site resolved to guest-physical memory, for a hotspot detector that
/// must tell apart two address spaces mapping the same virtual address.
public struct ResolvedSite: Hashable, Sendable {
    /// The site as counted (RIP as reported at the exit, kind, port or address, width, direction).
    public var site: ExitSite
    /// The address space: CR3 with the PCID and flag bits (11:0) masked out.
    public var addressSpace: UInt64
    /// The guest-physical address of the RIP reported at the exit: the
    /// instruction's first byte when ``position`` is on the instruction, the
    /// byte after its last when past it, and either when unknown. (RIP's page
    /// is translated; a past-RIP instruction that crosses a page boundary
    /// starts on the previous virtual page, which may map anywhere.)
    public var physicalRIP: GuestAddress
    /// Where RIP was relative to the instruction.
    public var position: RIPPosition

    /// The guest-physical address of the instruction's first byte, when
    /// bracketing found RIP on the instruction; `nil` otherwise (past it: a
    /// decoder finds the start; unknown: nothing tells).
    public var instructionStart: GuestAddress? {
        if case .onInstruction = position { physicalRIP } else { nil }
    }
}

/// Guest-virtual to guest-physical page translations of code pages, per
/// address space (masked CR3) and page, bounded.
struct SiteTranslationCache {
    struct Key: Hashable { var addressSpace: UInt64; var page: UInt64 }
    private(set) var pages: [Key: UInt64] = [:]
    static let limit = 4096

    func lookup(_ addressSpace: UInt64, _ virtualPage: UInt64) -> UInt64? { pages[Key(addressSpace: addressSpace, page: virtualPage)] }

    mutating func insert(_ addressSpace: UInt64, _ virtualPage: UInt64, physicalPage: UInt64) {
        if pages.count >= SiteTranslationCache.limit { pages.removeAll(keepingCapacity: true) }
        pages[Key(addressSpace: addressSpace, page: virtualPage)] = physicalPage
    }

    mutating func removeAll() { pages.removeAll() }
}

extension ExitContext {
    /// CR3 bits that hold the address of the top-level page table (PCID, PWT, PCD masked out).
    public static let addressSpaceMask: UInt64 = 0x000f_ffff_ffff_f000

    /// Resolves the current exit's site to the guest-physical address of the
    /// RIP reported at the exit, under its CR3, and finds by bracketing whether
    /// RIP was on or past the instruction.
    ///
    /// The address is the instruction's start only when RIP was on it
    /// (``ResolvedSite/instructionStart``, ``RIPPosition/onInstruction(length:)``).
    /// When RIP was already past it (``RIPPosition/pastInstruction``), it is
    /// the address of the byte after the instruction's last, and the
    /// instruction's start is not found here: a decoder finds it (the
    /// instruction ends there; DMP's locator finds it by decoding). Only
    /// RIP's page is translated, so an instruction that crosses a page
    /// boundary may begin on a page mapped elsewhere.
    ///
    /// Call it from a handler, after the access has its read data
    /// (``completeRead(_:at:)``, or ``forward(_:)`` to let the bus serve it):
    /// it completes a pending access (``completePendingAccess()``) to bracket
    /// it, so the rules of that call apply. It reads the special registers
    /// with one ioctl for this exit only and never writes them back (on
    /// shadow-paging hosts a write-back resets the MMU context). Page
    /// translations are cached per address space and page; call
    /// ``invalidateSiteTranslations()`` when the guest may have remapped code.
    ///
    /// - Throws: ``VMError/memory(_:)`` when RIP does not translate (unmapped,
    ///   non-canonical, an unsupported paging mode), or the errors of
    ///   ``completePendingAccess()``.
    public func resolveSite() throws(VMError) -> ResolvedSite {
        let before = try exitRIP()
        if hasPendingAccess && !isCompletingAccess { _ = try completePendingAccess() }
        let position: RIPPosition
        if let after = ripAfterCompletion {
            let moved = after &- before
            position = moved == 0 ? .pastInstruction : moved <= 15 ? .onInstruction(length: Int(moved)) : .unknown
        } else {
            position = .unknown
        }
        let sregs = try specialRegisters()
        let space = sregs.cr3 & ExitContext.addressSpaceMask
        let linear = sregs.isLongMode64 ? before : (sregs.cs.base &+ before) & 0xffff_ffff
        let page = linear & ~0xfff
        let physicalPage: UInt64
        if let p = siteCache.lookup(space, page) {
            physicalPage = p
        } else {
            do {
                physicalPage = try memory.translate(page, paging: PagingContext(sregs)).physical.rawValue & ~0xfff
            } catch { throw .memory(error) }
            siteCache.insert(space, page, physicalPage: physicalPage)
        }
        return ResolvedSite(site: ExitStatistics.site(for: currentExit, rip: before), addressSpace: space,
                            physicalRIP: GuestAddress(physicalPage | (linear & 0xfff)), position: position)
    }

    /// Forgets the cached code-page translations of ``resolveSite()``.
    public func invalidateSiteTranslations() { siteCache.removeAll() }
}
