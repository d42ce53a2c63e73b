/// Boots x86-64 guests without firmware: loads the image, builds the GDT,
/// identity page tables and PVH start info, and sets every vCPU's CPUID and
/// registers for entry.
///
/// Every vCPU starts at the same entry in the same state (there is no
/// INIT/SIPI yet); the guest tells them apart by their initial APIC ID
/// (CPUID leaf 1, EBX bits 31:24), which is the vCPU index.
public enum X86Boot {
    /// Loads `image` into `vm` and prepares every vCPU to enter it.
    public static func load(_ image: BootImage, commandLine: String = "", into vm: VirtualMachine) throws(VMError) -> LoadedImage {
        guard !vm.isRunning else { throw .invalidState("cannot load an image into a running VM") }
        let memSize = vm.configuration.memorySize
        guard memSize >= X86Layout.minimumMemory else {
            throw .loader(.memoryTooSmall(needed: X86Layout.minimumMemory, available: memSize))
        }
        let cmd = Array(commandLine.utf8)
        guard cmd.count < X86Layout.commandLineMaximum else {
            throw .loader(.commandLineTooLong(length: cmd.count, maximum: X86Layout.commandLineMaximum - 1))
        }
        let loaded: LoadedImage
        switch image {
        case .elf(let bytes):
            let elf: ELFImage
            do { elf = try ELFImage(bytes: bytes) } catch { throw .loader(error) }
            var ranges: [GuestRange] = []
            for (i, s) in elf.segments.enumerated() {
                let r = try place(index: i, at: s.physicalAddress, size: s.memorySize, memorySize: memSize)
                try write(Array(bytes[Int(s.fileOffset)..<Int(s.fileOffset + s.fileSize)]), at: s.physicalAddress, vm)
                if s.memorySize > s.fileSize {
                    do { try vm.memory.fill(0, at: GuestAddress(s.physicalAddress + s.fileSize), count: Int(s.memorySize - s.fileSize)) }
                    catch { throw .memory(error) }
                }
                ranges.append(r)
                if s.executable { try isolate(r, vm) }
            }
            // e_entry is virtual; the platform's identity map runs it at its physical address.
            let entry: LoadedImage.EntryMode
            if let pvh = elf.pvhEntry {
                // The PVH note's entry is physical: it must lie in what was loaded, like e_entry.
                guard ranges.contains(where: { $0.contains(GuestAddress(UInt64(pvh))) }) else {
                    throw .loader(.entryOutsideImage(UInt64(pvh)))
                }
                entry = .pvh(pvh)
            } else { entry = .long64(try physicalEntry(elf)) }
            loaded = LoadedImage(entry: entry, segments: ranges, symbols: elf.symbols, layout: ImageLayout(elf))
        case .flat(let bytes, let loadAddress, let entry):
            guard !bytes.isEmpty else { throw .loader(.empty) }
            let r = try place(index: 0, at: loadAddress, size: UInt64(bytes.count), memorySize: memSize)
            try write(bytes, at: loadAddress, vm)
            try isolate(r, vm)
            let e = entry ?? loadAddress
            guard r.contains(GuestAddress(e)) else { throw .loader(.entryOutsideImage(e)) }
            loaded = LoadedImage(entry: .long64(e), segments: [r], symbols: SymbolTable())
        }
        if case .long64 = loaded.entry, vm.vcpus.count > X86Layout.maximumLongModeVCPUs {
            throw .invalidConfiguration("long-mode entry: the platform's boot stacks fit \(X86Layout.maximumLongModeVCPUs) vCPUs, not \(vm.vcpus.count)")
        }
        try writePlatformTables(vm: vm, commandLine: cmd)
        try setUpVCPUs(vm: vm, entry: loaded.entry)
        return loaded
    }

    /// The physical address of `e_entry`, through the segment whose virtual range holds it.
    static func physicalEntry(_ elf: ELFImage) throws(VMError) -> UInt64 {
        for s in elf.segments where elf.entry >= s.virtualAddress && elf.entry - s.virtualAddress < s.memorySize {
            return s.physicalAddress + (elf.entry - s.virtualAddress)
        }
        if elf.segments.contains(where: { elf.entry >= $0.physicalAddress && elf.entry - $0.physicalAddress < $0.memorySize }) {
            return elf.entry
        }
        throw .loader(.entryOutsideImage(elf.entry))
    }

    private static func place(index: Int, at address: UInt64, size: UInt64, memorySize: UInt64) throws(VMError) -> GuestRange {
        let r = GuestRange(start: GuestAddress(address), size: size)
        let lowRAM = min(memorySize, VMConfiguration.lowMemoryLimit)
        guard let end = r.end, address >= X86Layout.kernelMinimum, end <= lowRAM,
              !r.overlaps(X86Layout.paravirtualArea) else {
            throw .loader(.segmentOutsideMemory(index: index, address: address, size: size))
        }
        return r
    }

    /// Gives the image's code memory slots of its own, so that guarding a code
    /// page (``MemorySlots/protect(_:)``) deletes and re-creates only code slots.
    private static func isolate(_ code: GuestRange, _ vm: VirtualMachine) throws(VMError) {
        do { try vm.slots.isolate(code) } catch { throw VMError(error) }
    }

    private static func write(_ bytes: [UInt8], at address: UInt64, _ vm: VirtualMachine) throws(VMError) {
        do { try vm.memory.write(bytes, at: GuestAddress(address)) } catch { throw .memory(error) }
    }

    /// GDT entries: null, 0x08 64-bit code, 0x10 data, 0x18 32-bit code.
    static let gdtEntries: [UInt64] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_9b00_0000_ffff]

    static func writePlatformTables(vm: VirtualMachine, commandLine: [UInt8]) throws(VMError) {
        let m = vm.memory
        do {
            for (i, e) in gdtEntries.enumerated() { try m.write(e, at: GuestAddress(X86Layout.gdt + UInt64(i) * 8)) }
            // Identity map of 0-4 GiB with 2 MiB pages: PML4 -> PDPT -> 4 PDs.
            let pdpt = X86Layout.pml4 + 0x1000
            try m.fill(0, at: GuestAddress(X86Layout.pml4), count: 0x6000)
            try m.write(pdpt | 0x3, at: GuestAddress(X86Layout.pml4))
            for g in 0..<UInt64(4) {
                let pd = pdpt + 0x1000 * (g + 1)
                try m.write(pd | 0x3, at: GuestAddress(pdpt + g * 8))
                for j in 0..<UInt64(512) {
                    try m.write(((g << 30) | (j << 21)) | 0x83, at: GuestAddress(pd + j * 8))
                }
            }
            // PVH start info, memory map and command line.
            let map = X86Layout.memoryMap(ram: vm.configuration.ramRanges)
            try m.fill(0, at: GuestAddress(X86Layout.startInfo), count: 0x1000)
            try m.write(UInt32(0x336e_c578), at: GuestAddress(X86Layout.startInfo))       // magic
            try m.write(UInt32(1), at: GuestAddress(X86Layout.startInfo + 4))             // version
            try m.write(X86Layout.commandLine, at: GuestAddress(X86Layout.startInfo + 24)) // cmdline_paddr
            try m.write(X86Layout.memoryMap, at: GuestAddress(X86Layout.startInfo + 40))   // memmap_paddr
            try m.write(UInt32(map.count), at: GuestAddress(X86Layout.startInfo + 48))     // memmap_entries
            for (i, (r, type)) in map.enumerated() {
                let e = X86Layout.memoryMap + UInt64(i) * 24
                try m.write(r.start.rawValue, at: GuestAddress(e))
                try m.write(r.size, at: GuestAddress(e + 8))
                try m.write(type, at: GuestAddress(e + 16))
            }
            try m.write(commandLine + [0], at: GuestAddress(X86Layout.commandLine))
        } catch { throw .memory(error) }
    }

    static func setUpVCPUs(vm: VirtualMachine, entry: LoadedImage.EntryMode) throws(VMError) {
        let supported: [CPUIDEntry]
        do { supported = try vm.backend.supportedCPUID() } catch { throw .backend(error) }
        for v in vm.vcpus {
            do {
                try v.backend.setCPUID(cpuid(supported, apicID: UInt32(v.id), count: UInt32(vm.vcpus.count)))
                var s = try v.backend.specialRegisters()
                var r = Registers()
                s.gdt = DescriptorTable(base: X86Layout.gdt, limit: UInt16(gdtEntries.count * 8 - 1))
                s.idt = DescriptorTable(base: 0, limit: 0)
                s.tr = Segment(selector: 0, type: 11, base: 0, limit: 0x67, s: false, g: false)
                s.ldt = Segment(selector: 0, type: 2, base: 0, limit: 0xffff, s: false, g: false)
                switch entry {
                case .pvh(let e):
                    let code = Segment(selector: 0x18, type: 0xb, db: true)
                    let data = Segment(selector: 0x10, type: 0x3, db: true)
                    s.cs = code
                    s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
                    s.cr0 = 0x11            // PE | ET
                    s.cr3 = 0; s.cr4 = 0; s.efer = 0
                    r.rip = UInt64(e)
                    r.rbx = X86Layout.startInfo
                case .long64(let e):
                    let code = Segment(selector: 0x08, type: 0xb, l: true)
                    let data = Segment(selector: 0x10, type: 0x3, db: true)
                    s.cs = code
                    s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
                    s.cr0 = 0x8005_0033     // PG | AM | WP | NE | ET | MP | PE
                    s.cr3 = X86Layout.pml4
                    s.cr4 = 0x620           // OSXMMEXCPT | OSFXSR | PAE
                    s.efer = 0x500          // LMA | LME
                    r.rip = e
                    r.rsp = X86Layout.initialStack - 0x1000 * UInt64(v.id)
                    r.rsi = X86Layout.startInfo
                }
                r.rflags = 2
                try v.backend.setSpecialRegisters(s)
                try v.backend.setRegisters(r)
            } catch { throw .backend(error) }
        }
    }

    /// Moves every vCPU of a loaded long-mode image to CPL3 at its entry: the
    /// user bit is set throughout the platform's identity map, CS and the
    /// data segments get DPL 3 (selectors 0x2b and 0x33), and IOPL is 3 so
    /// the code can still use port I/O. For tests and benchmarks that need
    /// guest code to run natively on every KVM host (some hosts emulate CPL0
    /// code); there is no IDT, so any exception ends the VM.
    package static func enterUserMode(_ vm: VirtualMachine) throws(VMError) {
        let m = vm.memory
        do {
            // PML4[0], the PDPT's 4 entries, then the 4 PDs' 2048 entries: contiguous from the PML4.
            for (first, count) in [(X86Layout.pml4, UInt64(1)), (X86Layout.pml4 + 0x1000, 4), (X86Layout.pml4 + 0x2000, 4 * 512)] {
                for i in 0..<count {
                    let e = GuestAddress(first + i * 8)
                    try m.write(try m.read(UInt64.self, at: e) | 4, at: e)
                }
            }
        } catch { throw .memory(error) }
        for v in vm.vcpus {
            do {
                var s = try v.backend.specialRegisters()
                s.cs = Segment(selector: 0x2b, type: 0xb, dpl: 3, l: true)
                let data = Segment(selector: 0x33, type: 0x3, dpl: 3, db: true)
                s.ss = data; s.ds = data; s.es = data; s.fs = data; s.gs = data
                try v.backend.setSpecialRegisters(s)
                var r = try v.backend.registers()
                r.rflags = 0x3002
                try v.backend.setRegisters(r)
            } catch { throw .backend(error) }
        }
    }

    /// The supported CPUID with this vCPU's APIC ID filled in and the hypervisor bit set.
    public static func cpuid(_ supported: [CPUIDEntry], apicID: UInt32, count: UInt32) -> [CPUIDEntry] {
        supported.map { e in
            var e = e
            switch e.function {
            case 1:
                e.ebx = (e.ebx & 0x0000_ffff) | (apicID << 24) | (min(count, 255) << 16)
                e.ecx |= 1 << 31
                if count > 1 { e.edx |= 1 << 28 }
            case 0xb, 0x1f:
                e.edx = apicID
            default: break
            }
            return e
        }
    }
}
