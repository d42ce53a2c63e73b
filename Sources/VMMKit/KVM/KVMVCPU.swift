import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// A KVM vCPU (the vCPU file descriptor) and its `kvm_run` mapping.
///
/// `kvm_run` is mapped once and never exposed: exits are decoded into
/// ``VMExit`` values and the exit's data is reached through
/// ``exitData(at:)``/``setExitData(_:at:)``. When the kernel supports sync
/// regs, the general registers come from `kvm_run` after every exit, so
/// reading them costs no ioctl.
public final class KVMVCPU: VCPUBackend {
    /// The vCPU file descriptor.
    public let fd: Int32
    /// The vCPU index.
    public let id: Int
    private let kvmRun: UnsafeMutablePointer<kvm_run>
    private let mmapSize: Int
    /// Whether the general registers travel through the sync-regs area.
    public let usesSyncRegs: Bool
    @exclusivity(unchecked) private var syncRegsValid = false
    private var thread: pthread_t?
    private let threadLock = ConditionLock()
    private let coalescedRing: UnsafeMutableRawPointer?

    init(fd: Int32, id: Int, mmapSize: Int, syncRegs: Bool, coalescedPage: Int32 = 0) throws(BackendError) {
        self.fd = fd
        self.id = id
        self.mmapSize = mmapSize
        let p = try Sys.mapShared(fd: fd, size: mmapSize)
        self.kvmRun = p.assumingMemoryBound(to: kvm_run.self)
        self.usesSyncRegs = syncRegs
        if coalescedPage > 0, Int(coalescedPage) * 4096 + 4096 <= mmapSize {
            coalescedRing = p + Int(coalescedPage) * 4096
        } else {
            coalescedRing = nil
        }
        if syncRegs { kvmRun.pointee.kvm_valid_regs = UInt64(KVM_SYNC_X86_REGS) }
        try Sys.installKickHandler()
    }

    deinit {
        Sys.unmap(UnsafeMutableRawPointer(kvmRun), size: mmapSize)
        Sys.close(fd)
    }

    /// An optional probe timing the VMM's side of each exit (benchmarks only).
    /// Set it before the VM starts.
    @exclusivity(unchecked) public var exitPathProbe: ExitPathProbe? {
        didSet { probe = exitPathProbe.map { Unmanaged.passUnretained($0) } }
    }
    /// The probe without reference counting on the exit path (``exitPathProbe`` keeps it alive).
    @exclusivity(unchecked) private var probe: Unmanaged<ExitPathProbe>?

    /// Runs until the next exit. The corresponding ioctl is `KVM_RUN`.
    public func run() throws(BackendError) -> VMExit {
        if let p = probe { p._withUnsafeGuaranteedRef { $0.enter() } }
        let (r, err) = Sys.ioctlRaw(fd, CKVM_RUN)
        if let p = probe { p._withUnsafeGuaranteedRef { $0.leave() } }
        if r < 0 {
            syncRegsValid = false
            readTarget = nil
            if err == .interrupted { return .interrupted }
            throw BackendError("KVM_RUN", errno: err)
        }
        syncRegsValid = usesSyncRegs
        return decodeExit()
    }

    private var raw: UnsafeMutableRawPointer { UnsafeMutableRawPointer(kvmRun) }

    /// Where the current exit's single read value goes (a one-element `in` or
    /// an MMIO load), checked against the mapping at decode: ``setExitData(_:at:)``
    /// stores element 0 there without decoding `kvm_run` again. `nil` otherwise.
    @exclusivity(unchecked) private var readTarget: UnsafeMutableRawPointer?
    @exclusivity(unchecked) private var readTargetSize = 0

    @inline(__always)
    private func decodeExit() -> VMExit {
        readTarget = nil
        let reason = kvmRun.pointee.exit_reason
        switch Int32(bitPattern: reason) {
        case KVM_EXIT_IO:
            let io = kvmRun.pointee.io
            let dir: AccessDirection = io.direction == UInt8(KVM_EXIT_IO_OUT) ? .write : .read
            var value: UInt64 = 0
            // The elements, checked against the mapping once.
            let size = Int(io.size), offset = Int(io.data_offset)
            let bytes = size * Int(io.count)
            if size >= 1, size <= 8, offset >= 0, bytes <= mmapSize - offset {
                if dir == .write {
                    if io.count == 1 { value = loadLE(raw + offset, count: size) }
                } else {
                    // A read nobody completes returns all ones (the PC convention), never stale data.
                    if io.count == 1 {
                        storeLE(.max, raw + offset, count: size)
                        readTarget = raw + offset
                        readTargetSize = size
                    }
                    else { (raw + offset).initializeMemory(as: UInt8.self, repeating: 0xff, count: bytes) }
                }
            }
            return .io(PortIO(port: io.port, size: io.size, count: io.count, direction: dir, value: value))
        case KVM_EXIT_MMIO:
            let m = kvmRun.pointee.mmio
            let len = UInt8(min(m.len, 8))
            let dir: AccessDirection = m.is_write != 0 ? .write : .read
            var value: UInt64 = 0
            if dir == .write { value = loadLE(raw + CKVM_RUN_MMIO_DATA_OFFSET, count: Int(len)) }
            else {
                storeLE(.max, raw + CKVM_RUN_MMIO_DATA_OFFSET, count: 8)
                readTarget = raw + CKVM_RUN_MMIO_DATA_OFFSET
                readTargetSize = Int(len)
            }
            return .mmio(MMIOAccess(address: GuestAddress(m.phys_addr), size: len, direction: dir, value: value))
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_FAIL_ENTRY:
            let f = kvmRun.pointee.fail_entry
            return .failEntry(reason: f.hardware_entry_failure_reason, cpu: f.cpu)
        case KVM_EXIT_INTERNAL_ERROR:
            let ie = kvmRun.pointee.internal
            let n = min(Int(ie.ndata), 16)
            return .internalError(InternalError(suberror: ie.suberror, words: withUnsafeBytes(of: ie.data) { ExitWords(loading: $0, count: n) }))
        case KVM_EXIT_SYSTEM_EVENT:
            let e = kvmRun.pointee.system_event
            return .systemEvent(type: e.type, flags: e.flags)
        case KVM_EXIT_HYPERCALL:
            let h = kvmRun.pointee.hypercall
            return .hypercall(nr: h.nr, args: withUnsafeBytes(of: h.args) { ExitWords(loading: $0, count: 6) })
        case KVM_EXIT_X86_RDMSR:
            return .msrRead(index: kvmRun.pointee.msr.index)
        case KVM_EXIT_X86_WRMSR:
            return .msrWrite(index: kvmRun.pointee.msr.index, value: kvmRun.pointee.msr.data)
        case KVM_EXIT_DEBUG:
            let d = kvmRun.pointee.debug.arch
            return .debug(exception: d.exception, pc: d.pc, dr6: d.dr6, dr7: d.dr7)
        case KVM_EXIT_INTR: return .interrupted
        case KVM_EXIT_IRQ_WINDOW_OPEN: return .irqWindowOpen
        default:
            return .unsupported(reason: reason)
        }
    }


    @inline(__always)
    private func loadLE(_ p: UnsafeRawPointer, count: Int) -> UInt64 {
        switch count {
        case 1: return UInt64(p.load(as: UInt8.self))
        case 2: return UInt64(UInt16(littleEndian: p.loadUnaligned(as: UInt16.self)))
        case 4: return UInt64(UInt32(littleEndian: p.loadUnaligned(as: UInt32.self)))
        case 8: return UInt64(littleEndian: p.loadUnaligned(as: UInt64.self))
        default:
            var v: UInt64 = 0
            for i in 0..<min(count, 8) { v |= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << (8 * UInt64(i)) }
            return v
        }
    }

    @inline(__always)
    private func storeLE(_ value: UInt64, _ p: UnsafeMutableRawPointer, count: Int) {
        switch count {
        case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
        case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: value).littleEndian, as: UInt16.self)
        case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, as: UInt32.self)
        case 8: p.storeBytes(of: value.littleEndian, as: UInt64.self)
        default:
            for i in 0..<min(count, 8) { p.storeBytes(of: UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))), toByteOffset: i, as: UInt8.self) }
        }
    }

    /// The location of port I/O element `index`, checked against the mapping.
    @inline(__always)
    private func ioElement(_ index: Int) -> (UnsafeMutableRawPointer, Int)? {
        let io = kvmRun.pointee.io
        let size = Int(io.size)
        guard index >= 0, index < Int(io.count), size > 0, size <= 8 else { return nil }
        let offset = Int(io.data_offset) + index * size
        guard offset >= 0, offset + size <= mmapSize else { return nil }
        return (raw + offset, size)
    }

    /// Element `index` of the current exit's data.
    public func exitData(at index: Int) -> UInt64 {
        switch Int32(bitPattern: kvmRun.pointee.exit_reason) {
        case KVM_EXIT_IO:
            guard let (p, size) = ioElement(index) else { return 0 }
            return loadLE(p, count: size)
        case KVM_EXIT_MMIO:
            guard index == 0 else { return 0 }
            return loadLE(raw + CKVM_RUN_MMIO_DATA_OFFSET, count: Int(min(kvmRun.pointee.mmio.len, 8)))
        case KVM_EXIT_X86_WRMSR:
            return index == 0 ? kvmRun.pointee.msr.data : 0
        case KVM_EXIT_INTERNAL_ERROR:
            let ie = kvmRun.pointee.internal
            guard index >= 0, index < min(Int(ie.ndata), 16) else { return 0 }
            return withUnsafeBytes(of: ie.data) { $0.load(fromByteOffset: index * 8, as: UInt64.self) }
        default:
            return 0
        }
    }

    /// Supplies element `index` of the data a read returns to the guest.
    public func setExitData(_ value: UInt64, at index: Int) {
        if index == 0, let p = readTarget {
            storeLE(value, p, count: readTargetSize)
            return
        }
        switch Int32(bitPattern: kvmRun.pointee.exit_reason) {
        case KVM_EXIT_IO:
            guard let (p, size) = ioElement(index) else { return }
            storeLE(value, p, count: size)
        case KVM_EXIT_MMIO:
            guard index == 0 else { return }
            storeLE(value, raw + CKVM_RUN_MMIO_DATA_OFFSET, count: Int(min(kvmRun.pointee.mmio.len, 8)))
        case KVM_EXIT_X86_RDMSR:
            guard index == 0 else { return }
            (raw + CKVM_RUN_MSR_DATA_OFFSET).storeBytes(of: value, as: UInt64.self)
            (raw + CKVM_RUN_MSR_ERROR_OFFSET).storeBytes(of: 0, as: UInt8.self)
        case KVM_EXIT_HYPERCALL:
            guard index == 0 else { return }
            kvmRun.pointee.hypercall.ret = value
        default:
            return
        }
    }

    /// Fails the current MSR exit: the guest gets #GP.
    public func rejectMSRAccess() {
        let r = Int32(bitPattern: kvmRun.pointee.exit_reason)
        guard r == KVM_EXIT_X86_RDMSR || r == KVM_EXIT_X86_WRMSR else { return }
        (raw + CKVM_RUN_MSR_ERROR_OFFSET).storeBytes(of: 1, as: UInt8.self)
    }

    /// Sets or clears `immediate_exit` (atomically; safe from any thread).
    public func setImmediateExit(_ on: Bool) { ckvm_store_immediate_exit(kvmRun, on ? 1 : 0) }

    /// Sets `immediate_exit` and signals the vCPU thread so that `KVM_RUN` returns.
    public func kick() {
        ckvm_store_immediate_exit(kvmRun, 1)
        // Signal under the lock: unbindThread() waits for it, so the thread
        // cannot have exited (and been joined) while we signal it.
        threadLock.lock()
        if let t = thread { Sys.kick(t) }
        threadLock.unlock()
    }

    /// Records the calling thread as this vCPU's thread.
    public func bindToCurrentThread() {
        _ = ckvm_unblock_kick_signal()
        threadLock.lock()
        thread = Sys.currentThread()
        threadLock.unlock()
    }

    /// Hands the writes batched in the coalesced ring to `body` and frees their slots.
    public func drainCoalescedWrites(_ body: (CoalescedWrite) -> Void) {
        guard let ring = coalescedRing else { return }
        // struct kvm_coalesced_mmio_ring { u32 first, last; struct kvm_coalesced_mmio entries[]; }
        // struct kvm_coalesced_mmio { u64 phys_addr; u32 len; u32 pio; u8 data[8]; }  (24 bytes)
        let entrySize = 24
        let maxEntries = UInt32((4096 - 8) / entrySize)
        var first = ring.load(as: UInt32.self) % maxEntries
        let last = ring.load(fromByteOffset: 4, as: UInt32.self) % maxEntries
        while first != last {
            let e = ring + 8 + Int(first) * entrySize
            let len = Int(min(e.load(fromByteOffset: 8, as: UInt32.self), 8))
            let pio = e.load(fromByteOffset: 12, as: UInt32.self) != 0
            body(CoalescedWrite(space: pio ? .pio : .mmio, address: e.load(as: UInt64.self), size: max(len, 1),
                                value: loadLE(e + 16, count: len)))
            first = (first + 1) % maxEntries
            ring.storeBytes(of: first, as: UInt32.self)
        }
    }

    /// Forgets the vCPU thread; later kicks only set `immediate_exit`.
    public func unbindThread() {
        threadLock.lock()
        thread = nil
        threadLock.unlock()
    }

    // MARK: registers

    private var syncRegs: UnsafeMutablePointer<kvm_regs> {
        (raw + CKVM_RUN_SYNC_REGS_OFFSET).assumingMemoryBound(to: kvm_regs.self)
    }

    /// RIP: from the sync-regs area after an exit (one load), else `KVM_GET_REGS`.
    public func instructionPointer() throws(BackendError) -> UInt64 {
        if syncRegsValid { return syncRegs.pointee.rip }
        return try registers().rip
    }

    /// The general registers. Reads the sync-regs area after an exit; otherwise the ioctl is `KVM_GET_REGS`.
    public func registers() throws(BackendError) -> Registers {
        if syncRegsValid { return Registers(syncRegs.pointee) }
        var r = kvm_regs()
        _ = try Sys.withStruct(&r) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_GET_REGS, p, "KVM_GET_REGS") }
        return Registers(r)
    }

    /// Sets the general registers: through the sync-regs area after an exit, else the ioctl `KVM_SET_REGS`.
    public func setRegisters(_ regs: Registers) throws(BackendError) {
        if syncRegsValid {
            syncRegs.pointee = regs.kvm
            kvmRun.pointee.kvm_dirty_regs |= UInt64(KVM_SYNC_X86_REGS)
            return
        }
        var r = regs.kvm
        _ = try Sys.withStruct(&r) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_SET_REGS, p, "KVM_SET_REGS") }
    }

    /// The special registers. The corresponding ioctl is `KVM_GET_SREGS`.
    public func specialRegisters() throws(BackendError) -> SpecialRegisters {
        var s = kvm_sregs()
        _ = try Sys.withStruct(&s) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_GET_SREGS, p, "KVM_GET_SREGS") }
        return SpecialRegisters(s)
    }

    /// Sets the special registers. The corresponding ioctl is `KVM_SET_SREGS`.
    public func setSpecialRegisters(_ sregs: SpecialRegisters) throws(BackendError) {
        var s = sregs.kvm
        _ = try Sys.withStruct(&s) { (p) throws(BackendError) in try Sys.ioctl(fd, CKVM_SET_SREGS, p, "KVM_SET_SREGS") }
    }

    /// Sets the guest's CPUID. The corresponding ioctl is `KVM_SET_CPUID2`.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(BackendError) {
        try withKVMFlexibleArray(kvm_cpuid2.self, kvm_cpuid_entry2.self, count: entries.count) { (buf, out) throws(BackendError) in
            buf.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(entries.count)
            for (i, e) in entries.enumerated() {
                out[i].function = e.function; out[i].index = e.index; out[i].flags = e.flags
                out[i].eax = e.eax; out[i].ebx = e.ebx; out[i].ecx = e.ecx; out[i].edx = e.edx
            }
            _ = try Sys.ioctl(fd, CKVM_SET_CPUID2, buf, "KVM_SET_CPUID2")
        }
    }

    private func withMSRBuffer<R>(_ entries: [MSREntry], _ body: (UnsafeMutableRawPointer, UnsafeMutablePointer<kvm_msr_entry>) throws(BackendError) -> R) throws(BackendError) -> R {
        try withKVMFlexibleArray(kvm_msrs.self, kvm_msr_entry.self, count: entries.count) { (buf, list) throws(BackendError) in
            buf.assumingMemoryBound(to: kvm_msrs.self).pointee.nmsrs = UInt32(entries.count)
            for (i, e) in entries.enumerated() {
                list[i].index = e.index
                list[i].data = e.value
            }
            return try body(buf, list)
        }
    }

    /// Reads MSRs. The corresponding ioctl is `KVM_GET_MSRS`.
    public func msrs(_ indices: [UInt32]) throws(BackendError) -> [MSREntry] {
        try withMSRBuffer(indices.map { MSREntry(index: $0, value: 0) }) { (buf, list) throws(BackendError) in
            let n = try Sys.ioctl(fd, CKVM_GET_MSRS, buf, "KVM_GET_MSRS")
            return (0..<min(Int(n), indices.count)).map { MSREntry(index: list[$0].index, value: list[$0].data) }
        }
    }

    /// Writes MSRs. The corresponding ioctl is `KVM_SET_MSRS`.
    public func setMSRs(_ entries: [MSREntry]) throws(BackendError) {
        try withMSRBuffer(entries) { (buf, _) throws(BackendError) in
            let n = try Sys.ioctl(fd, CKVM_SET_MSRS, buf, "KVM_SET_MSRS")
            if Int(n) != entries.count {
                throw BackendError("KVM_SET_MSRS", errno: .invalidArgument,
                                   detail: "set \(n) of \(entries.count); MSR 0x\(String(entries[Int(n)].index, radix: 16)) rejected")
            }
        }
    }

    private func getBytes<T>(_ type: T.Type, _ request: UInt, _ name: StaticString) throws(BackendError) -> [UInt8] {
        let v = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<T>.size, alignment: 16)
        defer { v.deallocate() }
        v.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
        _ = try Sys.ioctl(fd, request, v, name)
        return Array(UnsafeRawBufferPointer(start: v, count: MemoryLayout<T>.size))
    }

    private func setBytes<T>(_ type: T.Type, _ bytes: [UInt8], _ request: UInt, _ name: StaticString) throws(BackendError) {
        guard bytes.count == MemoryLayout<T>.size else {
            throw BackendError(String(describing: name), errno: .invalidArgument,
                               detail: "expected \(MemoryLayout<T>.size) bytes, got \(bytes.count)")
        }
        let v = UnsafeMutableRawPointer.allocate(byteCount: bytes.count, alignment: 16)
        defer { v.deallocate() }
        bytes.withUnsafeBytes { src in
            if let base = src.baseAddress { v.copyMemory(from: base, byteCount: src.count) }
        }
        _ = try Sys.ioctl(fd, request, v, name)
    }

    /// The FPU state. The corresponding ioctl is `KVM_GET_FPU`.
    public func fpu() throws(BackendError) -> FPUState { FPUState(bytes: try getBytes(kvm_fpu.self, CKVM_GET_FPU, "KVM_GET_FPU")) }
    /// Sets the FPU state. The corresponding ioctl is `KVM_SET_FPU`.
    public func setFPU(_ state: FPUState) throws(BackendError) { try setBytes(kvm_fpu.self, state.bytes, CKVM_SET_FPU, "KVM_SET_FPU") }
    /// The XSAVE area. The corresponding ioctl is `KVM_GET_XSAVE`.
    public func xsave() throws(BackendError) -> XSAVEState { XSAVEState(bytes: try getBytes(kvm_xsave.self, CKVM_GET_XSAVE, "KVM_GET_XSAVE")) }
    /// Sets the XSAVE area. The corresponding ioctl is `KVM_SET_XSAVE`.
    public func setXSAVE(_ state: XSAVEState) throws(BackendError) { try setBytes(kvm_xsave.self, state.bytes, CKVM_SET_XSAVE, "KVM_SET_XSAVE") }
    /// The local APIC. The corresponding ioctl is `KVM_GET_LAPIC`.
    public func lapic() throws(BackendError) -> LAPICState { LAPICState(bytes: try getBytes(kvm_lapic_state.self, CKVM_GET_LAPIC, "KVM_GET_LAPIC")) }
    /// Sets the local APIC. The corresponding ioctl is `KVM_SET_LAPIC`.
    public func setLAPIC(_ state: LAPICState) throws(BackendError) { try setBytes(kvm_lapic_state.self, state.bytes, CKVM_SET_LAPIC, "KVM_SET_LAPIC") }
    /// Pending events. The corresponding ioctl is `KVM_GET_VCPU_EVENTS`.
    public func vcpuEvents() throws(BackendError) -> VCPUEvents { VCPUEvents(bytes: try getBytes(kvm_vcpu_events.self, CKVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")) }
    /// Sets pending events. The corresponding ioctl is `KVM_SET_VCPU_EVENTS`.
    public func setVCPUEvents(_ events: VCPUEvents) throws(BackendError) { try setBytes(kvm_vcpu_events.self, events.bytes, CKVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS") }
}

/// A zeroed kvm.h header followed by `count` entries (`kvm_cpuid2`, `kvm_msrs`), for one ioctl.
func withKVMFlexibleArray<Header, Entry, R>(_ header: Header.Type, _ entry: Entry.Type, count: Int,
                                                 _ body: (UnsafeMutableRawPointer, UnsafeMutablePointer<Entry>) throws(BackendError) -> R) throws(BackendError) -> R {
    let bytes = MemoryLayout<Header>.size + max(1, count) * MemoryLayout<Entry>.stride
    let buf = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 16)
    defer { buf.deallocate() }
    buf.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
    return try body(buf, (buf + MemoryLayout<Header>.size).assumingMemoryBound(to: Entry.self))
}

// MARK: conversions between the Swift register types and kvm.h structs

extension Registers {
    init(_ r: kvm_regs) {
        self.init()
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var kvm: kvm_regs {
        kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                 r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                 rip: rip, rflags: rflags)
    }
}

extension Segment {
    init(_ s: kvm_segment) {
        self.init()
        base = s.base; limit = s.limit; selector = s.selector; type = s.type
        present = s.present != 0; dpl = s.dpl; db = s.db != 0; self.s = s.s != 0
        l = s.l != 0; g = s.g != 0; avl = s.avl != 0; unusable = s.unusable != 0
    }

    var kvm: kvm_segment {
        var k = kvm_segment()
        k.base = base; k.limit = limit; k.selector = selector; k.type = type
        k.present = present ? 1 : 0; k.dpl = dpl; k.db = db ? 1 : 0; k.s = s ? 1 : 0
        k.l = l ? 1 : 0; k.g = g ? 1 : 0; k.avl = avl ? 1 : 0; k.unusable = unusable ? 1 : 0
        return k
    }
}

extension SpecialRegisters {
    init(_ k: kvm_sregs) {
        self.init()
        cs = Segment(k.cs); ds = Segment(k.ds); es = Segment(k.es); fs = Segment(k.fs)
        gs = Segment(k.gs); ss = Segment(k.ss); tr = Segment(k.tr); ldt = Segment(k.ldt)
        gdt = DescriptorTable(base: k.gdt.base, limit: k.gdt.limit)
        idt = DescriptorTable(base: k.idt.base, limit: k.idt.limit)
        cr0 = k.cr0; cr2 = k.cr2; cr3 = k.cr3; cr4 = k.cr4; cr8 = k.cr8
        efer = k.efer; apicBase = k.apic_base
        interruptBitmap = withUnsafeBytes(of: k.interrupt_bitmap) { b in (0..<4).map { b.load(fromByteOffset: $0 * 8, as: UInt64.self) } }
    }

    var kvm: kvm_sregs {
        var k = kvm_sregs()
        k.cs = cs.kvm; k.ds = ds.kvm; k.es = es.kvm; k.fs = fs.kvm
        k.gs = gs.kvm; k.ss = ss.kvm; k.tr = tr.kvm; k.ldt = ldt.kvm
        k.gdt.base = gdt.base; k.gdt.limit = gdt.limit
        k.idt.base = idt.base; k.idt.limit = idt.limit
        k.cr0 = cr0; k.cr2 = cr2; k.cr3 = cr3; k.cr4 = cr4; k.cr8 = cr8
        k.efer = efer; k.apic_base = apicBase
        withUnsafeMutableBytes(of: &k.interrupt_bitmap) { b in
            for i in 0..<min(4, interruptBitmap.count) { b.storeBytes(of: interruptBitmap[i], toByteOffset: i * 8, as: UInt64.self) }
        }
        return k
    }
}
