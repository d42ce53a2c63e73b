import DMP
import Testing
import VMMKit

/// C guests from the compiler-flag sweep (the committed C guests' sources built with flags nobody here chose),
/// committed before the DMP work they showed was needed.
extension KVMTests {
    /// A warm-up of 100 batches: every store exits often enough to join the first plan as a sibling.
    @Test("c-doorbell-cpl3-unroll (-O3 -funroll-loops): DOORBELL stores back to back, where one store's exit RIP is the next one's start, all join db_run's copy as siblings; every store served, steady exits cut, same output")
    func dmpBackToBackStoresJoinAsSiblings() throws {
        let (off, on) = try doorbellRuns("c-doorbell-cpl3-unroll", commandLine: "iters=4096 warmup=1600")
        try expectEveryDoorbellStoreServed(on)
        for s in on.report where s.location.hasPrefix("db_run+") { #expect(s.hitsServed > 100, "\(s)") }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20, kicksExcluded: true)
    }

    @Test("c-doorbell-cpl3-unroll with siblings off: every store, back to back or not, gets hot in the copy on its own and joins by a rebuild; steady exits cut, same output")
    func dmpBackToBackStoresJoinByRebuilds() throws {
        let (off, on) = try doorbellRuns("c-doorbell-cpl3-unroll", commandLine: "iters=4096 warmup=1600", planSiblings: false)
        try expectEveryDoorbellStoreServed(on)
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, kicksExcluded: true)
    }

    @Test("c-doorbell-cpl3-ubuntu-lto (-O2 -flto, distribution defaults): db_run's copy, entered through a 5-byte instruction that crosses a page boundary, is rebuilt for the STATUS read that gets hot later (the write-time check takes that entry back across the boundary); both sites served, same output")
    func dmpRebuildOverEntryAcrossPages() throws {
        let (off, on) = try doorbellRuns("c-doorbell-cpl3-ubuntu-lto", commandLine: "iters=4096")
        let text = DMPReport.text(on.report)
        let status = try #require(on.report.first { $0.location.hasPrefix("db_run+") && $0.site.kind == .mmio && $0.site.direction == .read },
                                  "\(text)")
        #expect(status.state == .patched && status.refusal == nil, "\(text)")
        #expect(status.strategy.hasPrefix("function copy of db_run") && status.strategy.hasSuffix("(rebuilt 1x)"), "\(text)")
        for s in on.report where s.location.hasPrefix("db_run+") { #expect(s.hitsServed > 100, "\(s)") }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20, kicksExcluded: true)
    }

    @Test("c-selfmod-cpl3 (short of the target in every variant of the flag sweep): each of its three rewrites of its code page undoes the copies there; a site whose patch served a verification window's accesses before is patched again as soon as it is hot again, no back-off: over 90% of the steady exits gone at the default 200 lines, same output")
    func dmpRewrittenPagePaidPatchesReturn() throws {
        let off = try DMPLibraryRun("c-selfmod-cpl3", commandLine: "iters=200", dmp: false)
        let on = try DMPLibraryRun("c-selfmod-cpl3", commandLine: "iters=200", pollerIdle: 1_000_000_000)
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix("early_") }
        #expect(sites.count == 4, "\(text)")
        for s in sites {
            // Patched again after the last rewrite (its undo reason cleared by the new patch).
            #expect(s.state == .patched && s.refusal == nil && s.hitsServed > 0, "\(text)")
        }
        // With the back-off after each rewrite (64, 128, 256 exits of each site) 1,808 of 11,881 were left.
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    /// Retpolines: every `ret` of `ns8250_putc` is a `jmp __x86_return_thunk`. Taken for a return, the function's entry
    /// block is a way into its copy on every call; without it only redirects on the DELAY path (never taken while THRE
    /// is set) entered it, and two of its three sites served nothing (39,991 steady exits -> 26,661).
    @Test("c-freebsd-cpl3-retpoline (retpolines, -mfunction-return=thunk-extern): ns8250_putc, which returns through jmp __x86_return_thunk, is entered through its entry block; its three sites served, over 90% of the steady exits gone, same output")
    func dmpReturnThunkFunctionEnteredAtItsStart() throws {
        try expectSitesServed("c-freebsd-cpl3-retpoline", commandLine: "iters=300", sites: "ns8250_putc+", count: 3, copyOf: "ns8250_putc")
    }

    /// Retpolines at -Os: the port accessors are reached through `call __x86_indirect_thunk_rax` (serial_in's
    /// pointer loaded into rax first) and through `serial_out`, a load thunk (`mov rax, [rdi + 0x18]; jmp
    /// __x86_indirect_thunk_rax`). Both calls are promoted as the indirect calls they stand for; before, neither was
    /// (not one-jump thunks) and no site was served (29,833 steady exits -> 29,833).
    @Test("c-uart-cpl3-retpoline-Os (retpolines, -Os): the accessors' calls through the rax thunk and through the load thunk serial_out are promoted in serial8250_console_putchar's copy; the four sites served, over 90% of the steady exits gone, same output")
    func dmpRetpolineCallsPromoted() throws {
        try expectSitesServed("c-uart-cpl3-retpoline-Os", commandLine: "iters=200", sites: "io_serial_", count: 4,
                              copyOf: "serial8250_console_putchar")
    }

    /// gcc's own retpoline thunks (`-mindirect-branch=thunk`) carry no symbol size; `io_serial_out` (a 3-byte first
    /// instruction, no padding in reach) is reached only through `call __x86_indirect_thunk_rax`. The thunk is read at
    /// the call's target, whatever its symbol says; before, the call was refused ("starts no sized function") and the
    /// THR write never served (16,245 steady exits -> 8,123).
    @Test("c-portops-cpl3-retpoline-inline (gcc's unsized retpoline thunks): the THR write's accessor, called through call __x86_indirect_thunk_rax, is promoted in serial_puts_fast's copy and served, over 90% of the steady exits gone, same output")
    func dmpUnsizedThunkCallPromoted() throws {
        try expectSitesServed("c-portops-cpl3-retpoline-inline", commandLine: "iters=400", sites: "io_serial_out+0xc", count: 1,
                              copyOf: "serial_puts_fast", callersRows: false)
    }

    /// ftrace's pads: a 5-byte NOP first in every function (`__mcount_loc`) and sixteen NOPs before it
    /// (`__patchable_function_entries`), the bytes a kernel rewrites after checking they are what it expects. DMP used
    /// the first as the copies' entry instruction and the others as dead padding for its jumps; now every pad holds the
    /// guest's bytes while the patches are live, and the accessors are served from their caller's copy instead.
    @Test("c-uart-cpl3-ftrace (ftrace pads: -mfentry -mnop-mcount -mrecord-mcount, -fpatchable-function-entry=16,16): every pad the guest's tables record holds its own bytes while DMP's patches are live; the four UART sites served, over 90% of the steady exits gone, same output")
    func dmpFtracePadsLeftAlone() throws {
        let bytes = try guestImage("c-uart-cpl3-ftrace")
        let elf = try ELFImage(bytes: bytes)
        // The pads: the 8-byte addresses of both tables, 5 bytes at each __mcount_loc entry, 16 at the others.
        var pads: [(address: UInt64, size: Int)] = []
        for s in elf.sections ?? [] where s.name == "__mcount_loc" || s.name == "__patchable_function_entries" {
            let seg = try #require(elf.segments.first { s.address >= $0.virtualAddress && s.address - $0.virtualAddress < $0.fileSize })
            let at = Int(seg.fileOffset + (s.address - seg.virtualAddress))
            for o in stride(from: at, to: at + Int(s.size), by: 8) {
                pads.append(((0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[o + $1]) << (8 * UInt64($1)) }, s.name == "__mcount_loc" ? 5 : 16))
            }
        }
        #expect(pads.count > 40)
        let text = try #require(elf.segments.first { $0.executable })
        func original(_ a: UInt64, _ n: Int) -> [UInt8] {
            let o = Int(text.fileOffset + (a - text.virtualAddress)); return Array(bytes[o..<o + n])
        }
        var changed: [String] = []
        let off = try DMPLibraryRun("c-uart-cpl3-ftrace", commandLine: "iters=200", dmp: false)
        let on = try DMPLibraryRun("c-uart-cpl3-ftrace", commandLine: "iters=200", around: { vm, _, _, run in
            let stop = try run()
            for p in pads where try vm.memory.readBytes(at: GuestAddress(p.address), count: p.size) != original(p.address, p.size) {
                changed.append("0x" + String(p.address, radix: 16))
            }
            return stop
        })
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        #expect(changed.isEmpty, "pads written: \(changed)")
        let report = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix("io_serial_") && !$0.location.contains(" via ") }
        #expect(sites.count == 4 && sites.allSatisfy { $0.state == .patched && $0.hitsServed > 1000 }, "\(report)")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    /// The guest without and with DMP: exit 0 both, `count` sites whose location starts with `sites` (without
    /// `callersRows`, not counting the rows of other callers' copies, `accessor+off via caller+off`), each patched in a
    /// copy of `copyOf` and serving over 1,000 accesses, same output, over 90% of the steady exits gone.
    private func expectSitesServed(_ image: String, commandLine: String, sites prefix: String, count: Int, copyOf function: String,
                                   callersRows: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let off = try DMPLibraryRun(image, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(image, commandLine: commandLine)
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop, sourceLocation: sourceLocation)
        let text = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix(prefix) && (callersRows || !$0.location.contains(" via ")) }
        #expect(sites.count == count, "\(text)", sourceLocation: sourceLocation)
        for s in sites {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of \(function)") && s.hitsServed > 1000, "\(text)",
                    sourceLocation: sourceLocation)
        }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, sourceLocation: sourceLocation)
    }

    /// A doorbell guest without and with DMP. Verification off, a poller that does not sleep and a long append
    /// wait: these tests are about what the plan serves (synchronous appends under load are the verifier's,
    /// VerifyKVMTests).
    private func doorbellRuns(_ image: String, commandLine: String,
                              planSiblings: Bool = true) throws -> (off: DMPLibraryRun, on: DMPLibraryRun) {
        let off = try DMPLibraryRun(image, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(image, commandLine: commandLine, pollerIdle: 1_000_000_000) {
            $0.planSiblings = planSiblings
            $0.synchronousWaitLimit = 1 << 20
            $0.verify = false
        }
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        return (off, on)
    }

    /// Sixteen store instructions, each patched in db_run's copy: the loop's entry store, seven behind the
    /// Duff's-device entry, eight in the unrolled loop (two of them end where the next store begins); no other
    /// store's exits charged to one as its fallbacks.
    private func expectEveryDoorbellStoreServed(_ on: DMPLibraryRun) throws {
        let text = DMPReport.text(on.report)
        let doorbell = StandardDevices.doorbellBase + DoorbellDevice.doorbellOffset
        let stores = on.report.filter { $0.location.hasPrefix("db_run+") && $0.site.kind == .mmio && $0.site.address == doorbell }
        #expect(Set(stores.compactMap(\.instructionAddress)).count == 16, "\(text)")
        for s in stores {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of db_run"), "\(text)")
            #expect(s.exitsWhilePatched < 8, "\(text)")
        }
    }
}
