import CKVM
import Synchronization

/// Errors from guest memory access and guest page-table walks.
public enum GuestMemoryError: Error, Hashable, Sendable, CustomStringConvertible {
    /// No memory region contains this address.
    case invalidAddress(GuestAddress)
    /// The access starts in a region but runs past its end after `completed` of `expected` bytes.
    case partialBuffer(expected: Int, completed: Int)
    /// The address computation overflowed 64 bits.
    case overflow(base: UInt64, length: UInt64)
    /// Regions overlap or are malformed when the memory is set up.
    case invalidRegion(String)
    /// The host could not allocate backing memory.
    case allocationFailed(size: UInt64, errno: Errno)
    /// A guest-virtual address is not canonical for 4-level paging.
    case nonCanonical(virtual: UInt64)
    /// The page walk met a not-present entry at `level` (4 = PML4 ... 1 = PT).
    case pageNotPresent(virtual: UInt64, level: Int)
    /// The page walk found a mapping that does not allow the access.
    case protectionViolation(virtual: UInt64, access: PageAccess)
    /// The page walk does not support this paging mode (32-bit, PAE, 5-level).
    case unsupportedPagingMode(PagingContext.Mode)
    /// A device (DMA) write targeted a read-only region.
    case readOnly(GuestAddress)
    /// A paging-structure entry has a reserved bit set (for example PS in a PML4E).
    case reservedBit(virtual: UInt64, level: Int)
    /// An atomic access needs a naturally aligned address.
    case misaligned(GuestAddress, alignment: Int)

    /// A one-line description.
    public var description: String {
        switch self {
        case .invalidAddress(let a): "guest-physical address \(a) is not backed by guest memory"
        case .partialBuffer(let e, let c): "access ran past the end of a memory region after \(c) of \(e) bytes"
        case .overflow(let b, let l): "address 0x\(String(b, radix: 16)) + \(l) overflows"
        case .invalidRegion(let why): "invalid memory region: \(why)"
        case .allocationFailed(let size, let e): "could not allocate \(size) bytes of guest memory: \(e)"
        case .nonCanonical(let v): "virtual address 0x\(String(v, radix: 16)) is not canonical"
        case .pageNotPresent(let v, let l): "virtual address 0x\(String(v, radix: 16)) not present at paging level \(l)"
        case .protectionViolation(let v, let a): "virtual address 0x\(String(v, radix: 16)) does not allow \(a)"
        case .unsupportedPagingMode(let m): "the page walk does not support paging mode \(m)"
        case .readOnly(let a): "guest-physical address \(a) is in a read-only region"
        case .reservedBit(let v, let l): "reserved bit set at paging level \(l) for 0x\(String(v, radix: 16))"
        case .misaligned(let a, let n): "guest-physical address \(a) is not \(n)-byte aligned for an atomic access"
        }
    }
}

/// One contiguous range of guest-physical memory backed by host memory.
public struct GuestRegion: @unchecked Sendable {
    /// The guest-physical range the region covers.
    public let range: GuestRange
    /// The host address of the region's first byte.
    public let host: UnsafeMutableRawPointer
    /// Whether the guest may write the region (a read-only slot turns guest writes into MMIO exits).
    public let readOnly: Bool
}

/// The guest's physical memory: a set of non-overlapping regions with checked
/// reads and writes and a guest-virtual to guest-physical page walk.
///
/// Host memory is allocated with anonymous `mmap` and freed when the
/// ``GuestMemory`` is deinitialized; hypervisor memory slots refer to it, so the
/// ``GuestMemory`` must outlive the VM (``VirtualMachine`` arranges that).
///
/// Guest memory is shared with running vCPUs: reads may observe concurrent
/// guest writes, as on real hardware. Every access is bounds checked.
public final class GuestMemory: @unchecked Sendable {
    /// The regions, sorted by guest-physical address.
    public let regions: [GuestRegion]
    private let owned: [(UnsafeMutableRawPointer, Int)]

    /// Allocates zeroed memory for each range (sorted; they must not overlap).
    ///
    /// - Parameter layout: `(range, readOnly)` pairs.
    public init(ranges layout: [(GuestRange, Bool)]) throws(GuestMemoryError) {
        let sorted = layout.sorted { $0.0.start < $1.0.start }
        for (i, (r, _)) in sorted.enumerated() {
            guard r.size > 0, r.size % 4096 == 0, r.start.rawValue % 4096 == 0 else {
                throw .invalidRegion("\(r) is empty or not page aligned")
            }
            guard r.end != nil else { throw .overflow(base: r.start.rawValue, length: r.size) }
            if i > 0, sorted[i - 1].0.overlaps(r) {
                throw .invalidRegion("\(sorted[i - 1].0) overlaps \(r)")
            }
        }
        var regions: [GuestRegion] = []
        var owned: [(UnsafeMutableRawPointer, Int)] = []
        for (r, ro) in sorted {
            guard r.size <= UInt64(Int.max) else { throw .allocationFailed(size: r.size, errno: .outOfMemory) }
            let p: UnsafeMutableRawPointer
            switch HostMemory.mapAnonymous(size: Int(r.size)) {
            case .success(let ptr): p = ptr
            case .failure(let e):
                for (q, n) in owned { HostMemory.unmap(q, size: n) }
                throw .allocationFailed(size: r.size, errno: e)
            }
            owned.append((p, Int(r.size)))
            regions.append(GuestRegion(range: r, host: p, readOnly: ro))
        }
        self.regions = regions
        self.owned = owned
    }

    /// Convenience: one writable region `[0, size)`.
    public convenience init(size: UInt64) throws(GuestMemoryError) {
        try self.init(ranges: [(GuestRange(start: GuestAddress(0), size: size), false)])
    }

    deinit {
        for (p, n) in owned { HostMemory.unmap(p, size: n) }
    }

    /// The region containing `address`, if any (a binary search over the sorted regions).
    @inline(__always)
    public func region(containing address: GuestAddress) -> GuestRegion? {
        var lo = 0, hi = regions.count
        while lo < hi {
            let mid = (lo + hi) >> 1
            if regions[mid].range.start <= address { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return nil }
        let r = regions[lo - 1]
        return r.range.contains(address) ? r : nil
    }

    /// Whether `[address, address + length)` is wholly backed by one region.
    public func isValid(_ address: GuestAddress, length: UInt64) -> Bool {
        guard let r = region(containing: address) else { return length == 0 ? false : false }
        return r.range.contains(address, length: length)
    }

    /// The host pointer for `[address, address + length)`, checked to lie in one region.
    @inline(__always)
    func hostPointer(_ address: GuestAddress, length: Int) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        guard length >= 0 else { throw .overflow(base: address.rawValue, length: 0) }
        guard address.adding(UInt64(length)) != nil else {
            throw .overflow(base: address.rawValue, length: UInt64(length))
        }
        guard let r = region(containing: address) else { throw .invalidAddress(address) }
        let off = address.rawValue - r.range.start.rawValue
        let avail = r.range.size - off
        guard UInt64(length) <= avail else {
            throw .partialBuffer(expected: length, completed: Int(avail))
        }
        return r.host + Int(off)
    }

    /// Copies `buffer.count` bytes from guest memory at `address` into `buffer`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        let p = try hostPointer(address, length: buffer.count)
        base.copyMemory(from: p, byteCount: buffer.count)
    }

    /// Reads `count` bytes at `address`.
    public func readBytes(at address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        guard count > 0 else { return [] }
        let p = try hostPointer(address, length: count)
        return Array(UnsafeRawBufferPointer(start: p, count: count))
    }

    /// Writes `bytes` into guest memory at `address` (all or nothing).
    ///
    /// Like every host-side write, it is applied even where pages are
    /// guarded (``MemorySlots/protect(_:)``), and then reported to the guard
    /// observer (see ``protectedRanges``).
    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        guard bytes.count > 0, let src = bytes.baseAddress else { return }
        let p = try hostPointer(address, length: bytes.count)
        p.copyMemory(from: src, byteCount: bytes.count)
        noteHostWrite(address, bytes.count)
    }

    /// Writes `bytes` into guest memory at `address` (all or nothing).
    public func write(_ bytes: [UInt8], at address: GuestAddress) throws(GuestMemoryError) {
        try writeAsGuardOwner(bytes, at: address)
        noteHostWrite(address, bytes.count)
    }

    /// Writes `bytes` at `address` without reporting it to the guard observer:
    /// for the owner of the guards (DMP writing or restoring its own patch
    /// bytes in a page it guarded), which must not hear its own writes.
    package func writeAsGuardOwner(_ bytes: [UInt8], at address: GuestAddress) throws(GuestMemoryError) {
        guard !bytes.isEmpty else { return }
        let p = try hostPointer(address, length: bytes.count)
        bytes.withUnsafeBytes { src in
            if let base = src.baseAddress { p.copyMemory(from: base, byteCount: src.count) }
        }
    }

    /// Reads a plain value (little-endian, unaligned allowed) at `address`.
    @inline(__always)
    public func read<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let p = try hostPointer(address, length: MemoryLayout<T>.size)
        return T(littleEndian: p.loadUnaligned(as: T.self))
    }

    /// Writes a plain value (little-endian, unaligned allowed) at `address`.
    @inline(__always)
    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let p = try hostPointer(address, length: MemoryLayout<T>.size)
        p.storeBytes(of: value.littleEndian, as: T.self)
        noteHostWrite(address, MemoryLayout<T>.size)
    }

    /// Writes a plain value on behalf of a device (DMA): like ``write(_:at:)-(T,_)``,
    /// but refuses read-only regions (ROM), which the guest cannot write either.
    /// Guarded pages are RAM: the write is applied and reported, as for any host-side write.
    public func dmaWrite<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        if let r = region(containing: address), r.readOnly { throw .readOnly(address) }
        try write(value, at: address)
    }

    /// Loads a 32-bit word with acquire ordering (a naturally aligned index or
    /// sequence word that another CPU publishes): later reads see what was
    /// written before it was stored with release ordering.
    public func loadAcquire(_ type: UInt32.Type = UInt32.self, at address: GuestAddress) throws(GuestMemoryError) -> UInt32 {
        guard address.rawValue % 4 == 0 else { return try read(UInt32.self, at: address) }
        let p = try hostPointer(address, length: 4)
        return ckvm_load_acquire_u32(p)
    }

    /// Stores a 32-bit word with release ordering.
    public func storeRelease(_ value: UInt32, at address: GuestAddress) throws(GuestMemoryError) {
        guard address.rawValue % 4 == 0 else { return try write(value, at: address) }
        let p = try hostPointer(address, length: 4)
        ckvm_store_release_u32(p, value)
        noteHostWrite(address, 4)
    }

    /// Fills `[address, address + count)` with `byte`.
    public func fill(_ byte: UInt8, at address: GuestAddress, count: Int) throws(GuestMemoryError) {
        guard count > 0 else { return }
        let p = try hostPointer(address, length: count)
        p.initializeMemory(as: UInt8.self, repeating: byte, count: count)
        noteHostWrite(address, count)
    }

    // MARK: The guard view

    /// The number of protected page runs (read without the lock on every host write).
    private let protectedRunCount = Atomic<Int>(0)
    /// Set once any page was ever protected: from then on MMIO writes into RAM are guard writes.
    private let guardsUsed = Atomic<Bool>(false)
    private let guardLock = ConditionLock()
    private var protectedList: [GuestRange] = []
    private var hostWriteObserver: (@Sendable (GuestRange) -> Void)?

    /// The guarded (protected) page runs, sorted and merged: RAM the guest can
    /// read and execute but whose writes exit (their memory slots are read-only).
    /// Kept in sync by ``MemorySlots``.
    public var protectedRanges: [GuestRange] { guardLock.withLock { protectedList } }

    /// Whether any page is guarded now.
    public var hasProtectedPages: Bool { protectedRunCount.load(ordering: .acquiring) != 0 }

    /// Whether the page holding `address` is guarded.
    public func isProtected(_ address: GuestAddress) -> Bool {
        isProtected(address, length: 1)
    }

    /// Whether any byte of `[address, address + length)` lies in a guarded page.
    public func isProtected(_ address: GuestAddress, length: UInt64) -> Bool {
        guard length > 0, hasProtectedPages else { return false }
        let probe = GuestRange(start: address, size: min(length, UInt64.max - address.rawValue))
        return guardLock.withLock { GuestMemory.firstOverlap(protectedList, probe) != nil }
    }

    /// Whether the guest may write `address` without an exit: it is RAM (not a
    /// read-only region) and its page is not guarded.
    public func isGuestWritable(_ address: GuestAddress) -> Bool {
        guard let r = region(containing: address), !r.readOnly else { return false }
        return !isProtected(address)
    }

    /// Whether guards were ever used in this memory (MMIO writes into RAM are then guard writes).
    package var guardsEverUsed: Bool { guardsUsed.load(ordering: .acquiring) }

    /// Replaces the guarded page runs (sorted, merged, page aligned). ``MemorySlots`` calls it.
    package func setProtected(_ ranges: [GuestRange]) {
        guardLock.withLock {
            protectedList = ranges
            if !ranges.isEmpty { guardsUsed.store(true, ordering: .releasing) }
            protectedRunCount.store(ranges.count, ordering: .releasing)
        }
    }

    /// Sets the closure told about every host-side write that touches a guarded
    /// page (after it was applied), with the bytes written.
    package func setHostWriteObserver(_ observer: (@Sendable (GuestRange) -> Void)?) {
        guardLock.withLock { hostWriteObserver = observer }
    }

    /// Reports a host-side write to the observer when it touched a guarded page.
    @inline(__always)
    private func noteHostWrite(_ address: GuestAddress, _ count: Int) {
        guard protectedRunCount.load(ordering: .relaxed) != 0 else { return }
        let range = GuestRange(start: address, size: UInt64(count))
        let observer: (@Sendable (GuestRange) -> Void)? = guardLock.withLock {
            GuestMemory.firstOverlap(protectedList, range) != nil ? hostWriteObserver : nil
        }
        observer?(range)
    }

    /// Applies a guest store that exited (a write into a guarded page) without
    /// reporting it as a host write: `size` bytes of `value`, little-endian.
    /// Bytes past the end of the region are dropped (KVM splits a store at a
    /// page boundary into per-page fragments, so it never sends such a store).
    /// Returns the range written.
    package func applyGuestStore(_ value: UInt64, size: Int, at address: GuestAddress) throws(GuestMemoryError) -> GuestRange {
        guard size >= 1, size <= 8 else { throw .partialBuffer(expected: size, completed: 0) }
        guard let r = region(containing: address) else { throw .invalidAddress(address) }
        let off = address.rawValue - r.range.start.rawValue
        let n = Int(min(UInt64(size), r.range.size - off))
        let p = r.host + Int(off)
        for i in 0..<n { p.storeBytes(of: UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))), toByteOffset: i, as: UInt8.self) }
        return GuestRange(start: address, size: UInt64(n))
    }

    /// The index of the first range in sorted, disjoint `list` that overlaps `probe`.
    static func firstOverlap(_ list: [GuestRange], _ probe: GuestRange) -> Int? {
        guard probe.size > 0 else { return nil }
        // First range whose end is past probe.start.
        var lo = 0, hi = list.count
        while lo < hi {
            let mid = (lo + hi) >> 1
            let end = list[mid].start.rawValue &+ list[mid].size
            if end <= probe.start.rawValue { lo = mid + 1 } else { hi = mid }
        }
        guard lo < list.count, list[lo].overlaps(probe) else { return nil }
        return lo
    }
}
