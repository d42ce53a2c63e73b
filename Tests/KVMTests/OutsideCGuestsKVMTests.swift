import DMP
import Testing
import VMMKit

/// The C guests written in styles the DMP developers do not use (`Guests/c-table-cpl3.c`, `Guests/c-mmio-cpl3.c`:
/// runtimes of their own, a table-driven 8250 behind `switch` jump tables, a sink table of callbacks, an
/// out-of-line `noinline` port write reached by tail calls, Linux-style `readl`/`writel`, a doorbell loop
/// unrolled into 16 stores). Committed before DMP work on them; DMP must never change what they print.
extension KVMTests {
    @Test("DMP on the outside-style C guests: output and exit status identical to DMP off", arguments: [
        ("c-table-cpl3", "iters=400"), ("c-mmio-cpl3", "iters=4096"), ("c-boot-cpl3", "iters=400"),
    ])
    func dmpOutsideCGuestsSameOutput(name: String, commandLine: String) throws {
        let off = try DMPLibraryRun(name, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(name, commandLine: commandLine)
        #expect(off.stop == .guestExit(status: 0))
        #expect(on.stop == off.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        #expect(!on.report.isEmpty, "DMP saw hot sites")
    }
}

extension KVMTests {
    /// The sites of c-mmio-cpl3's `db_ring_full` (a loop `#pragma GCC unroll 16` made into sixteen 2-byte DOORBELL stores).
    private func ringFullSites(_ run: DMPLibraryRun) -> [PatchSite] {
        run.report.filter { $0.location.hasPrefix("db_ring_full") && $0.site.kind == .mmio && $0.site.address == 0xd000_0040 }
    }

    @Test("DMP on c-mmio-cpl3: the sixteen unrolled DOORBELL stores are served by one function copy (MMIO siblings in the hot site's page get its linear page), same output")
    func dmpMMIOSiblings() throws {
        let off = try DMPLibraryRun("c-mmio-cpl3", commandLine: "iters=8192", dmp: false)
        // Verification off: this is about what the plan serves (rate judgments of bursty sites are the verifier's).
        let on = try DMPLibraryRun("c-mmio-cpl3", commandLine: "iters=8192", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let sites = ringFullSites(on)
        #expect(sites.count == 16, "\(on.report.map(\.description))")
        #expect(sites.allSatisfy { $0.state == .patched && $0.hitsServed > 0 }, "\(sites.map(\.description))")
        #expect(Set(sites.map(\.strategy)).count == 1, "one copy serves them all: \(Set(sites.map(\.strategy)))")
        // Planned together, at the first store's plan (the detector's window counts exits, not time): without the
        // siblings' linear page each store would get hot alone and join the copy by a rebuild.
        #expect(sites.allSatisfy { !$0.strategy.contains("rebuilt") }, "\(Set(sites.map(\.strategy)))")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 4, kicksExcluded: true)
    }

    @Test("DMP on c-mmio-cpl3-O1: db_ring_full, called only from db_run, whose copy is made first, is entered through the call in db_run's live copy; its sixteen stores are served, same output")
    func dmpCallSiteInLiveCopy() throws {
        let off = try DMPLibraryRun("c-mmio-cpl3-O1", commandLine: "iters=8192", dmp: false)
        // Verification off: this is about the way in (rate judgments of bursty synchronous appends are the verifier's).
        let on = try DMPLibraryRun("c-mmio-cpl3-O1", commandLine: "iters=8192", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let status = try #require(on.report.first { $0.location.hasPrefix("db_run+") && $0.site.address == 0xd000_0004 },
                                  "\(on.report.map(\.description))")
        #expect(status.state == .patched && status.hitsServed > 0, "\(status)")
        let sites = ringFullSites(on)
        #expect(sites.count == 16, "\(on.report.map(\.description))")
        #expect(sites.allSatisfy { $0.state == .patched && $0.hitsServed > 0 }, "\(sites.map(\.description))")
        #expect(sites.allSatisfy { $0.strategy.contains("call site in a live copy") }, "\(Set(sites.map(\.strategy)))")
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
    }

    @Test("a site that gets hot in the original of a live function copy (the thread had not entered the copy yet) rebuilds that copy; no second patch over the first")
    func dmpRebuildFromOriginal() throws {
        let off = try DMPLibraryRun("c-mmio-cpl3", commandLine: "iters=8192", dmp: false)
        // Each site planned alone: the vCPU stopped after the first store goes on through the original's next fifteen.
        let on = try DMPLibraryRun("c-mmio-cpl3", commandLine: "iters=8192", pollerIdle: 1_000_000_000) { $0.verify = false; $0.planSiblings = false }
        #expect(on.stop == .guestExit(status: 0))
        let sites = ringFullSites(on)
        #expect(sites.count == 16, "\(on.report.map(\.description))")
        #expect(sites.allSatisfy { $0.state == .patched && $0.hitsServed > 0 }, "\(sites.map(\.description))")
        #expect(sites.allSatisfy { $0.strategy.contains("rebuilt") }, "\(Set(sites.map(\.strategy)))")
        #expect(Set(sites.map(\.strategy)).count == 1)
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
    }
}

extension KVMTests {
    /// c-table-cpl3 (gcc -O2: `jmp [rdx*8 + table]`) and c-table-cpl3-cet (a distribution's `-fcf-protection=full
    /// -fpie`: gcc's PIC table, `lea rcx, [rip + table]`, `movsxd`, `add`, `notrack jmp rdx`).
    @Test("DMP on c-table-cpl3 (gcc -O2, and -fcf-protection=full -fpie): the LSR read behind uart_read's switch jump table is served (the dispatch stays in the copy), the tail-called pio_write8 too; over 90% of the steady exits gone, same output", arguments: [
        ("c-table-cpl3", "uart_read+0x3b"), ("c-table-cpl3-cet", "uart_read+0x43"),
    ])
    func dmpJumpTableGuest(image: String, lsrRead: String) throws {
        let off = try DMPLibraryRun(image, commandLine: "iters=400", dmp: false)
        let on = try DMPLibraryRun(image, commandLine: "iters=400")
        #expect(on.stop == .guestExit(status: 0))
        let read = try #require(on.site(lsrRead), "\(on.report.map(\.description))")
        #expect(read.state == .patched && read.hitsServed > 1000, "\(read)")
        let write = try #require(on.report.first { $0.location == "pio_write8+0x4" && $0.site.address == 0x3f8 })
        #expect(write.state == .patched && write.hitsServed > 1000, "\(write)")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }
}

extension KVMTests {
    @Test("a stripped guest (no symbols, as X86Boot loads a stripped ELF): every site that needs a function copy is refused with the reason, nothing is patched, output and status as without DMP", arguments: [
        ("c-table-cpl3", "iters=300"), ("c-mmio-cpl3", "iters=2048"),
    ])
    func dmpStrippedGuest(name: String, commandLine: String) throws {
        let off = try DMPLibraryRun(name, commandLine: commandLine, dmp: false)
        let on = try DMPLibraryRun(name, commandLine: commandLine) { $0.symbols = SymbolTable() }
        #expect(on.stop == off.stop && off.stop == .guestExit(status: 0))
        #expect(on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == resultField(off.text, "checksum"))
        #expect(!on.report.isEmpty)
        for s in on.report {
            #expect(s.state == .refused, "\(s)")
            let reason = s.refusal?.reason ?? ""
            // Without a symbol to decode from, an instruction ending at RIP can also be ambiguous (a REX byte before it).
            #expect(reason.contains("no sized function symbol covers") && reason.contains("stripped")
                    || reason.contains("ambiguous") && reason.contains("no function symbol covers it")
                    || reason.contains("offers no fast path"), "\(s)")
        }
    }
}

extension KVMTests {
    @Test("DMP on c-mmio-index-cpl3-Os: read_at, copied first and entered through the call in run's live copy, keeps that way in when run's copy is rebuilt (the rebuilt copy calls read_at's copy); over 95% of the steady exits gone, same output")
    func dmpRebuiltCallerCallsLiveCopy() throws {
        let off = try DMPLibraryRun("c-mmio-index-cpl3-Os", commandLine: "iters=20000", dmp: false)
        // Verification off: this is about the ways in (rate judgments of synchronous appends under load are the verifier's).
        let on = try DMPLibraryRun("c-mmio-index-cpl3-Os", commandLine: "iters=20000", pollerIdle: 1_000_000_000) { $0.verify = false }
        #expect(on.stop == .guestExit(status: 0))
        let read = try #require(on.site("read_at"), "\(on.report.map(\.description))")
        // Every STATUS read after the patch (562 at iters=20000) served in the guest, none left exiting at read_at.
        #expect(read.state == .patched && read.hitsServed >= 500 && read.exitsWhilePatched < 16, "\(read)")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 20, kicksExcluded: true)
    }
}
