import DMP
import Logging
import Testing
import VMMKit
#if canImport(Glibc)
import Synchronization
#endif

// DMP's transparency contract (issue 6, "Transparency" and "Bad input";
// DESIGN.md, "The DMP pipeline"): a guest run with DMP and without shows the
// same serial output and exit status, and after `unpatchAll()` the same
// memory outside the implant, the rings and the live stacks.

/// A guest run with the standard devices and, when a configuration is given, DMP.
final class DMPGuestRun {
    let vm: VirtualMachine
    let devices: StandardDevices
    let console = CapturedOutput()
    let loaded: LoadedImage
    let dmp: DMPMiddleware?

    /// DMP as minivmm's `--dmp` sets it up, with a low threshold so short runs patch.
    static func configuration(threshold: Int = 16, dryRun: Bool = false) -> DMPConfiguration {
        var c = DMPConfiguration()
        c.threshold = threshold
        c.userModeFastPaths = true
        c.dryRun = dryRun
        return c
    }

    /// DMP's decisions (`patched`, `undone`, ...), as logged.
    let decisions = DecisionLog()

    init(_ image: String, commandLine: String, dmp: DMPConfiguration?, memory: UInt64 = 32 << 20,
         ringPolling: PVRingPolling = .enabled(), ringSlotCount: UInt32 = 512,
         setup: (VirtualMachine) throws -> Void = { _ in }) throws {
        vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: memory))
        devices = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: ringPolling,
                                              ringSlotCount: ringSlotCount)
        try setup(vm)
        loaded = try X86Boot.load(.elf(try guestImage(image)), commandLine: commandLine, into: vm)
        if var c = dmp {
            c.use(loaded)
            let log = decisions
            var logger = Logger(label: "kvmtests.dmp") { _ in log }
            logger.logLevel = .info
            self.dmp = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
        } else {
            self.dmp = nil
        }
    }

    func run() throws -> StopReason { try vm.run() }

    /// The console output with the guest's own timing figure masked: `cycles_per_iter` is TSC cycles
    /// the guest measured, which no two runs share (DMP or not). Every other byte must match.
    var output: String { DMPGuestRun.maskTiming(console.text) }

    /// Lines are split at every LF scalar (a CRLF is one `Character` in Swift, which a split at "\n" would not cut); a
    /// line may begin with the CR of a console that ends lines with "\n\r" (the BSDs' `cnputc`).
    static func maskTiming(_ text: String) -> String {
        text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).map { scalars -> String in
            let line = String(String.UnicodeScalarView(scalars))
            guard line.drop(while: { $0 == "\r" }).hasPrefix("RESULT ") else { return line }
            return line.split(separator: " ", omittingEmptySubsequences: false).map { w in
                w.hasPrefix("cycles_per_iter=") ? "cycles_per_iter=*" : String(w)
            }.joined(separator: " ")
        }.joined(separator: "\n")
    }

    /// Whether `range` differs from `other`'s memory only in the accessed and dirty bits (5 and 6) of entries of
    /// the guest's page tables under vCPU 0's CR3: the CPU sets them when the guest's code or data reaches the
    /// implant through its own mappings (a guest whose tables do not preset them, like `c-packed-cpl3`), and DMP
    /// never writes page tables, so they stay set after `unpatchAll()`.
    func onlyAccessedDirtyBits(_ range: Range<UInt64>, against other: DMPGuestRun) throws -> Bool {
        let sregs = try vm.vcpus[0].specialRegisters()
        guard let tables = GuardPolicy.pageTablePages(memory: vm.memory, paging: PagingContext(sregs), fiveLevel: sregs.cr4 & (1 << 12) != 0)
        else { return false }
        for at in range {
            let mine = try vm.memory.readBytes(at: GuestAddress(at), count: 1)[0]
            let theirs = try other.vm.memory.readBytes(at: GuestAddress(at), count: 1)[0]
            guard mine == theirs || tables.contains(at & ~0xfff) && at % 8 == 0 && (mine ^ theirs) & ~0x60 == 0 else { return false }
        }
        return true
    }

    /// The report rows at `symbol+offset` locations starting with `function`.
    func sites(in function: String) -> [PatchSite] {
        (dmp?.report() ?? []).filter { $0.location.hasPrefix(function + "+") }
    }

    /// Guest-physical ranges whose contents legitimately differ between two runs of the same
    /// guest at the same point: the live stacks (return addresses into implanted copies and
    /// TSC values in dead frames), the TSC readings, the buffer the RESULT line (with its
    /// cycle count) was formatted in, and the C guests' count of transmitted bytes (the
    /// cycle count's digits vary; ``checkTransmittedCount(against:)`` checks that field exactly).
    var timingAndStacks: [Range<UInt64>] {
        // c-table-cpl3's line buffer and byte count, c-boot-cpl3's log ring and its indices hold the RESULT
        // line's text or length, whose cycle count varies from run to run; c-printf-cpl3's tx_hash and
        // c-freebsd-cpl3's cn_hash hash every byte sent, the RESULT line's too; c-linux8250-cpl3 formats each record in
        // printk_buf, hashes it into log_hash and counts its bytes in serial8250_ports' port.tx; c-openbsd-cpl3's
        // msgbuf_hash hashes every byte logged and splx_calls counts them.
        let names: Set<String> = ["stacks", "user_stack", "tsc_start", "tsc_end", "printk_buf.0",
                                  "com1_lines", "bytes_logged", "log_ring", "log_head", "log_tail", "tx_hash", "cn_hash",
                                  "printk_buf", "log_hash", "serial8250_ports", "msgbuf_hash", "splx_calls"]
        var out = loaded.symbols.symbols.filter { names.contains($0.name) }.map { physical($0.address)..<(physical($0.address) + $0.size) }
        if let t = transmittedCountAddress { out.append(t..<(t + 8)) }
        return out
    }

    /// The guest-physical address of the image's virtual address `v` (a higher-half image links its symbols above
    /// where it is loaded), through the segment that holds it.
    func physical(_ v: UInt64) -> UInt64 {
        guard let l = loaded.layout,
              let i = l.segments.indices.first(where: { v >= l.virtualAddresses[$0] && v - l.virtualAddresses[$0] < l.segments[$0].size })
        else { return v }
        return l.segments[i].start.rawValue + (v - l.virtualAddresses[i])
    }

    /// The C guests' `com1.tx_chars` (`struct uart_port`, Guests/c/serial.h: offset 32).
    var transmittedCountAddress: UInt64? {
        loaded.symbols.symbols.first { $0.name == "com1" && $0.size >= 40 }.map { $0.address + 32 }
    }

    /// The C guests' transmitted-byte counts differ by exactly the difference in output length (the cycle count's digits).
    func checkTransmittedCount(against other: DMPGuestRun) throws {
        guard let a = transmittedCountAddress else { return }
        let mine = try vm.memory.read(UInt64.self, at: GuestAddress(a))
        let theirs = try other.vm.memory.read(UInt64.self, at: GuestAddress(a))
        #expect(Int64(bitPattern: mine &- theirs) == Int64(console.data.count - other.console.data.count))
        // Where every byte goes through the driver, the count is the output's length (c-mmio-mixed-cpl3 writes
        // its progress digits with an `outb` of its own, which the driver does not count).
        if theirs == UInt64(other.console.data.count) { #expect(mine == UInt64(console.data.count)) }
    }
}

/// A swift-log handler that keeps every message and its `reason`, for assertions on DMP's decisions.
final class DecisionLog: LogHandler, @unchecked Sendable {
    private let entries = Mutex<[(message: String, reason: String)]>([])
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        let reason = metadata?["reason"].map { "\($0)" } ?? ""
        entries.withLock { $0.append((message.description, reason)) }
    }
    /// The reasons of every message `message`.
    func reasons(_ message: String) -> [String] { entries.withLock { $0.filter { $0.message == message }.map(\.reason) } }
}

/// `[a, b)` as `0x…-0x… (symbol)`.
private func describe(_ r: Range<UInt64>, _ symbols: SymbolTable) -> String {
    "0x" + String(r.lowerBound, radix: 16) + "-0x" + String(r.upperBound, radix: 16)
        + " (" + (symbols.symbolize(r.lowerBound) ?? "no symbol") + ")"
}

/// The byte ranges (merged, at most 16) where `a` and `b` differ in `[0, size)` outside `excluded`.
func differingRanges(_ a: GuestMemory, _ b: GuestMemory, size: UInt64, excluding excluded: [Range<UInt64>]) throws -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    let chunk: UInt64 = 1 << 20
    var base: UInt64 = 0
    while base < size, out.count < 16 {
        let n = Int(min(chunk, size - base))
        let x = try a.readBytes(at: GuestAddress(base), count: n), y = try b.readBytes(at: GuestAddress(base), count: n)
        if x != y {
            for i in 0..<n where x[i] != y[i] {
                let at = base + UInt64(i)
                if excluded.contains(where: { $0.contains(at) }) { continue }
                if let last = out.last, last.upperBound + 16 >= at { out[out.count - 1] = last.lowerBound..<(at + 1) }
                else if out.count < 16 { out.append(at..<(at + 1)) } else { break }
            }
        }
        base += UInt64(n)
    }
    return out
}

/// Runs `image` without DMP and then with DMP's test configuration; expects the same stop reason and
/// the same output (timing masked). Returns both runs and the stop reason. `prepare` sees the DMP run before it starts.
func offAndOn(_ image: String, _ commandLine: String,
              prepare: (DMPGuestRun) -> Void = { _ in }) throws -> (off: DMPGuestRun, on: DMPGuestRun, stop: StopReason) {
    let off = try DMPGuestRun(image, commandLine: commandLine, dmp: nil)
    let stop = try off.run()
    let on = try DMPGuestRun(image, commandLine: commandLine, dmp: DMPGuestRun.configuration())
    prepare(on)
    #expect(try on.run() == stop)
    #expect(on.output == off.output, "\(image): \(on.output.suffix(300)) vs \(off.output.suffix(300))")
    return (off, on, stop)
}

/// The ranges of `range`, as a Swift range.
private func span(_ r: GuestRange) -> Range<UInt64> { r.start.rawValue..<(r.start.rawValue + r.size) }

/// Every guest image and a command line that keeps its run short.
let transparencyGuests: [(String, String)] = [
    ("hello", "exit=3"), ("selftest", ""), ("selftest", "test=strio"), ("selftest", "test=mmioread"),
    ("uart-cpl0", "iters=40"), ("uart-cpl3", "iters=40"), ("doorbell-cpl3", "iters=64"),
    ("uart-cpl0-pv", "iters=40"), ("uart-cpl3-pv", "iters=40"), ("doorbell-cpl3-pv", "iters=64"),
    ("c-uart-cpl3", "iters=40"), ("c-doorbell-cpl3", "iters=64"), ("c-selfmod-cpl3", "iters=40"),
    ("uart-modes-cpl3", "lines=20 rounds=2"), ("copy-rebuild-cpl3", "lines=200"),
    ("c-uart-cpl3-Os", "iters=40"), ("c-uart-cpl3-O1", "iters=40"),
    ("c-table-cpl3", "iters=120"), ("c-mmio-cpl3", "iters=256"), ("c-boot-cpl3", "iters=60"),
    ("mmio-siblings-cpl3", "iters=2048"),
    // Built with other flags (a distribution's -fcf-protection=full -fpie; -Os).
    ("c-table-cpl3-cet", "iters=120"), ("c-poll-cpl3-Os", "iters=40"), ("c-console-cpl3-Os", "iters=40"),
    ("c-mmio-cpl3-O1", "iters=256"), ("c-mmio-index-cpl3-Os", "iters=256"), ("c-doorbell-cpl3-unroll", "iters=256"),
    ("c-doorbell-cpl3-ubuntu-lto", "iters=256"),
    // Retpolines (thunks for indirect branches and returns).
    ("c-freebsd-cpl3-retpoline", "iters=60"), ("c-uart-cpl3-retpoline-Os", "iters=40"), ("c-portops-cpl3-retpoline-inline", "iters=60"), ("c-uart-cpl3-ftrace", "iters=40"),
    // The MMIO style sweep.
    ("c-mmio-mixed-cpl3", "iters=256"), ("c-mmio-widths-cpl3", "iters=256"), ("c-mmio-poll-cpl3", "iters=256"),
    // Port accessors through pointers, called from several functions.
    ("c-portops-cpl3", "iters=60"), ("c-portops-cpl3", "iters=60 slow=1"),
    // Inline poll loops in every output function, at -O0 (one out-of-line outb for two ports).
    ("c-manyloops-cpl3-O0", "iters=60"),
    // Drivers and runtimes nobody here wrote: an embedded printf library (a callback reached by a tail jump).
    ("c-printf-cpl3", "iters=60"), ("c-freebsd-cpl3-noalign", "iters=60"),
    // Linux's 8250 console (at -Os a sibling call through port->serial_out from a function called directly).
    ("c-linux8250-cpl3", "iters=60"), ("c-linux8250-cpl3-Os", "iters=60"),
    ("c-linux8250-earlycon-cpl3-Os", "iters=60"), ("c-linux8250-earlycon-cpl3-noalign", "iters=60"),
    // OpenBSD's com(4) console: the putc ends in a tail call (no ret).
    ("c-openbsd-cpl3", "iters=60"), ("c-openbsd-cpl3-noalign", "iters=60"),
    // Real MMIO drivers' idioms on the doorbell: virtio-mmio's notify callback, NVMe's strided doorbells.
    ("c-virtio-notify-cpl3", "iters=256"), ("c-nvme-sqdb-cpl3", "iters=256"),
    // Packed images: the hot code's page shares read-only data, or written data.
    ("c-packed-cpl3", "iters=60"), ("c-packed-cpl3-data", "iters=60"),
    ("c-portstat-cpl3-noalign", "iters=60 slow=1 trace=1"),
    ("c-consoleops-cpl3-noalign", "iters=60"),
    // A higher-half kernel, with and without the low identity map.
    ("c-higher-cpl3", "iters=60"), ("c-higher-cpl3", "iters=60 lowmap=0"),
]

extension KVMTests {
    @Test("DMP on and off: byte-identical UART output (cycle counts masked) and the same exit status, for every guest",
          arguments: transparencyGuests)
    func dmpTransparentOutput(image: String, commandLine: String) throws {
        let off = try DMPGuestRun(image, commandLine: commandLine, dmp: nil)
        let offStop = try off.run()
        let on = try DMPGuestRun(image, commandLine: commandLine, dmp: DMPGuestRun.configuration())
        let onStop = try on.run()
        #expect(onStop == offStop)
        #expect(on.output == off.output, "\(image): \(on.output.suffix(300)) vs \(off.output.suffix(300))")
        #expect(!off.output.isEmpty)
        // Not vacuous: where the guest's UART loop runs long enough, DMP patched it and served accesses in the guest.
        let report = on.dmp?.report() ?? []
        switch image {
        case "uart-cpl3", "uart-cpl0", "uart-cpl3-pv", "uart-cpl0-pv", "hello", "doorbell-cpl3", "uart-modes-cpl3":
            let putc = on.sites(in: "uart_putc")
            #expect(Set(putc.map(\.site.address)) == [0x3f8, 0x3fd], "\(DMPReport.text(report))")
            #expect(putc.allSatisfy { [.patched, .undone, .disabled].contains($0.state) }, "\(DMPReport.text(report))")
            #expect(putc.allSatisfy { $0.hitsServed > 0 }, "\(DMPReport.text(report))")
        case "c-uart-cpl3", "c-uart-cpl3-Os", "c-uart-cpl3-O1":
            #expect(report.contains { $0.state == .patched && $0.hitsServed > 0 }, "\(DMPReport.text(report))")
        default:
            break
        }
        if image == "uart-cpl3" {
            // The CPL3 UART loop stays patched (no undo) and most of its accesses never exit.
            let putc = on.sites(in: "uart_putc")
            #expect(putc.count == 2 && putc.allSatisfy { $0.state == .patched && $0.hitsServed > 100 }, "\(DMPReport.text(report))")
        }
    }

    @Test("after unpatchAll() at guest exit, memory outside the implant, the rings and the live stacks equals a run that never patched",
          arguments: transparencyGuests.filter { !$0.0.hasPrefix("selftest") })
    func dmpUnpatchRestoresMemory(image: String, commandLine: String) throws {
        let off = try DMPGuestRun(image, commandLine: commandLine, dmp: nil)
        let offStop = try off.run()
        let on = try DMPGuestRun(image, commandLine: commandLine, dmp: DMPGuestRun.configuration())
        #expect(try on.run() == offStop)
        let patched = (on.dmp?.report() ?? []).filter { $0.state == .patched }
        on.dmp?.unpatchAll()
        let after = on.dmp?.report() ?? []
        #expect(!after.contains { $0.state == .patched })
        #expect(patched.allSatisfy { p in after.contains { $0.site == p.site && $0.state == .undone } })
        let excluded = [span(X86Layout.implantArea), span(X86Layout.ringArea)] + off.timingAndStacks
        let diff = try differingRanges(off.vm.memory, on.vm.memory, size: off.vm.configuration.memorySize, excluding: excluded)
            .filter { try !on.onlyAccessedDirtyBits($0, against: off) }
        #expect(diff.isEmpty, "\(image): differs at \(diff.map { describe($0, off.loaded.symbols) })")
        try on.checkTransmittedCount(against: off)
        // The comparison covers the image's code: every code byte DMP patched is back.
        for s in patched {
            guard let a = s.physicalAddress?.rawValue else { continue }
            #expect(try on.vm.memory.readBytes(at: GuestAddress(a), count: 1) == off.vm.memory.readBytes(at: GuestAddress(a), count: 1))
        }
    }

    @Test("--dmp-dry-run changes no guest byte: memory after a dry run equals a DMP-off run, implant and rings included",
          arguments: [("uart-cpl3", "iters=40"), ("uart-cpl0", "iters=40"), ("doorbell-cpl3", "iters=64"),
                      ("c-uart-cpl3", "iters=40"), ("c-doorbell-cpl3", "iters=64"), ("c-uart-cpl3-Os", "iters=40")])
    func dmpDryRunChangesNothing(image: String, commandLine: String) throws {
        let off = try DMPGuestRun(image, commandLine: commandLine, dmp: nil)
        let offStop = try off.run()
        let dry = try DMPGuestRun(image, commandLine: commandLine, dmp: DMPGuestRun.configuration(dryRun: true))
        #expect(try dry.run() == offStop)
        #expect(dry.output == off.output)
        let report = dry.dmp?.report() ?? []
        #expect(report.contains { $0.state == .wouldPatch }, "the dry run found something to patch: \(DMPReport.text(report))")
        #expect(!report.contains { $0.state == .patched })
        #expect(report.allSatisfy { $0.hitsServed == 0 })
        let diff = try differingRanges(off.vm.memory, dry.vm.memory, size: off.vm.configuration.memorySize,
                                       excluding: off.timingAndStacks)
        #expect(diff.isEmpty, "\(image): differs at \(diff.map { describe($0, off.loaded.symbols) })")
        try dry.checkTransmittedCount(against: off)
        // Not one implant byte was written either.
        #expect(try dry.vm.memory.readBytes(at: X86Layout.implantArea.start, count: Int(X86Layout.implantArea.size))
                .allSatisfy { $0 == 0 })
    }
}

extension KVMTests {
    @Test("a ring of four slots keeps the output in order: DMP's ring appends and the static-PV twin, with and without the polling consumer, and with one that sleeps after 1 µs idle (woken by the appends)",
          arguments: ["uart-cpl3", "uart-cpl0", "uart-cpl3-pv"], ["poller", "none", "sleepy poller"])
    func dmpFourSlotRingKeepsOrder(image: String, poller: String) throws {
        let polling: PVRingPolling = switch poller {
        case "poller": .enabled()
        case "sleepy poller": .enabled(idleNanoseconds: 1_000)
        default: .disabled
        }
        let commandLine = "iters=60"
        let off = try DMPGuestRun(image, commandLine: commandLine, dmp: nil)
        let offStop = try off.run()
        let pv = image.hasSuffix("-pv")
        let on = try DMPGuestRun(image, commandLine: commandLine, dmp: pv ? nil : DMPGuestRun.configuration(),
                                 ringPolling: polling, ringSlotCount: 4)
        #expect(on.devices.rings.slotCount == 4)
        #expect(try on.run() == offStop)
        #expect(on.output == off.output, "\(image): \(on.output.suffix(300))")
        let stats = on.devices.rings.statistics(ring: 0)
        // The ring carried the bytes (so four slots were reused many times over) and nothing was skipped.
        #expect(stats.consumed > 16, "\(image): \(stats)")
        #expect(stats.holes == 0 && stats.invalidHints == 0)
        if !pv {
            let report = on.dmp?.report() ?? []
            #expect(report.contains { $0.fastPath.hasPrefix("ring 0") && $0.hitsServed > 16 }, "\(DMPReport.text(report))")
        }
    }

    @Test("c-selfmod-cpl3 rewrites its own patched code: output identical to DMP off; each rewrite undoes the patches on that page, with the reason")
    func dmpSelfModifyingGuest() throws {
        let (_, on, stop) = try offAndOn("c-selfmod-cpl3", "iters=40")
        #expect(stop == .guestExit(status: 0))
        #expect(resultField(on.console.text, "checksum") == "0x15d62744")
        let report = on.dmp?.report() ?? []
        // Patched (function copies that served accesses in the guest) ...
        #expect(report.contains { $0.strategy.hasPrefix("function copy") && $0.hitsServed > 0 }, "\(DMPReport.text(report))")
        // ... and undone by the guest's own write into the guarded code page: once per rewrite (at each
        // quarter of the run) for each of the two copies.
        let undone = on.decisions.reasons("undone")
        let byGuest = undone.filter { $0.contains("the guest wrote into a guarded page") }
        #expect(byGuest.count >= 2 && byGuest.count == undone.count, "\(undone)")
        #expect(on.decisions.reasons("patched").count >= byGuest.count, "patched again after each rewrite")
    }
}

extension KVMTests {
    @Test("c-uart-cpl3: every site the report calls patched serves its accesses in the guest (the THR write and LSR read too, not only the port-0x80 delays)")
    func dmpCUartPatchedSitesServe() throws {
        let on = try DMPGuestRun("c-uart-cpl3", commandLine: "iters=60", dmp: DMPGuestRun.configuration())
        #expect(try on.run() == .guestExit(status: 0))
        let report = on.dmp?.report() ?? []
        let patched = report.filter { $0.state == .patched }
        #expect(Set(patched.map(\.site.address)) == [0x80, 0x3f8, 0x3fd], "\(DMPReport.text(report))")
        // The copies are entered before the device access, not only at the hot `out 0x80, al` after it.
        for s in patched { #expect(s.hitsServed > 100, "\(s.location): \(DMPReport.text(report))") }
        #expect(on.vm.statistics()[.io] < 600, "most of the 60 lines' ~2,600 bytes never exit")
    }
}

/// What the host scribbles on while the guest runs.
enum Scribble: String, CaseIterable, Sendable, CustomStringConvertible {
    /// The implant's data pages (the top 16 KiB: enable words and hit counters).
    case implantData
    /// Ring 0's producer hint (guest-written, untrusted).
    case ringHint
    /// Ring 0's slot words.
    case ringSlots

    var description: String { rawValue }

    /// Writes pseudo-random words over the target, from `seed`.
    func write(_ memory: GuestMemory, seed: UInt64) {
        var x = seed | 1
        func next() -> UInt64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x }
        let ring = X86Layout.ringArea.start.rawValue
        switch self {
        case .implantData:
            let top = X86Layout.implantArea.start.rawValue + X86Layout.implantArea.size
            var a = top - 0x4000
            while a < top { try? memory.write(next(), at: GuestAddress(a)); a += 8 }
        case .ringHint:
            try? memory.write(next(), at: GuestAddress(ring + PVRingLayout.hintOffset))
        case .ringSlots:
            for i in 0..<UInt64(512) {
                try? memory.write(next(), at: GuestAddress(ring + PVRingLayout.slotsOffset + i * PVRingLayout.slotSize))
            }
        }
    }
}

extension KVMTests {
    @Test("a guest whose UART leaves the fast paths' preconditions mid-stream (DLAB set, loopback on) sees exactly what it would without DMP")
    func dmpUARTModeChanges() throws {
        let (_, on, stop) = try offAndOn("uart-modes-cpl3", "lines=20 rounds=3")
        #expect(stop == .guestExit(status: 0))
        // What the guest read back: the bytes written through uart_putc landed in the divisor latch and the receive FIFO.
        let lines = on.output.split(separator: "\n")
        #expect(lines.filter { $0 == "dlab: dll=4c dlm=5a lsr=60" }.count == 3, "\(on.output.suffix(400))")
        #expect(lines.filter { $0 == "loop: lsr=61 rx=414243 lsr=60 msr=b0" }.count == 3, "\(on.output.suffix(400))")
        #expect(lines.last == "done" && lines.count == 3 * (20 + 2) + 1)
        // uart_putc was patched before the first excursion and stayed patched; during the excursions its
        // implanted code fell back to the original instructions (exits charged to the sites).
        let putc = on.sites(in: "uart_putc")
        let report = DMPReport.text(on.dmp?.report() ?? [])
        #expect(putc.count == 2 && putc.allSatisfy { $0.state == .patched && $0.hitsServed > 100 }, "\(report)")
        #expect(putc.first { $0.site.address == 0x3f8 }.map { $0.exitsWhilePatched >= 5 * 2 } == true, "\(report)")
    }

    @Test("a guest that scribbles over the implant's data (enable words, hit counters) before every mode change: output and status as without DMP")
    func dmpGuestScribblesImplantData() throws {
        let (_, on, stop) = try offAndOn("uart-modes-cpl3", "lines=20 rounds=3 scribble=1")
        #expect(stop == .guestExit(status: 0))
        let putc = on.sites(in: "uart_putc")
        #expect(putc.count == 2)
        // The scribbled counters went down or jumped by more than one hit per ns (or, for the THR write's ring
        // append, past what ring 0 consumed): untrusted, kept at their last plausible value, which is at most the
        // accesses really served (one LSR read and one THR write per byte of output).
        let report = DMPReport.text(on.dmp?.report() ?? [])
        for s in putc { #expect(s.hitsServed <= UInt64(on.console.data.count), "\(report)") }
        #expect(putc.contains { $0.hitCounterDistrust != nil }, "\(report)")
        #expect(report.contains("hit counters written by the guest"))
        #expect(on.decisions.reasons("hit counter untrusted").contains { $0.contains("the guest wrote the hit counter") })
    }

    @Test("a guest that overwrites the implant's code: DMP guards it, the write undoes the patches that enter it, the output is that of the DMP-off run")
    func dmpGuestOverwritesImplantCode() throws {
        let commandLine = "lines=20 rounds=3 scribble=2"
        let off = try DMPGuestRun("uart-modes-cpl3", commandLine: commandLine, dmp: nil)
        let offStop = try off.run()
        #expect(offStop == .guestExit(status: 0))
        let on = try DMPGuestRun("uart-modes-cpl3", commandLine: commandLine, dmp: DMPGuestRun.configuration())
        let stop = try on.run()
        #expect(stop == offStop)
        #expect(on.output == off.output)
        #expect(on.console.text.contains("loop: lsr=61 rx=414243 lsr=60 msr=b0"))
    }

    @Test("the host scribbles on DMP's shared words while the guest runs: the VMM stays up, output and status as without DMP",
          arguments: Scribble.allCases)
    func dmpHostScribbles(_ target: Scribble) throws {
        let commandLine = "lines=60 rounds=3"
        let off = try DMPGuestRun("uart-modes-cpl3", commandLine: commandLine, dmp: nil)
        let offStop = try off.run()
        let on = try DMPGuestRun("uart-modes-cpl3", commandLine: commandLine, dmp: DMPGuestRun.configuration()) { vm in
            let tick = Atomic<UInt64>(0)
            vm.addPeriodicTask(every: 100_000) { vm throws(VMError) in
                target.write(vm.memory, seed: 0x9e37_79b9_7f4a_7c15 &* (tick.add(1, ordering: .relaxed).newValue))
                return nil
            }
        }
        let stop = try on.run()
        let report = DMPReport.text(on.dmp?.report() ?? [])
        if target == .implantData {
            // Patched, and its hit counters scribbled from the start: not believed (HitCount), never inflated.
            #expect(on.sites(in: "uart_putc").contains { $0.hotToPatchedNanoseconds != nil && $0.hitCounterDistrust != nil },
                    "the scribbles hit a live patch: \(report)")
            #expect(on.sites(in: "uart_putc").allSatisfy { $0.hitsServed <= UInt64(on.console.data.count) }, "\(report)")
        } else {
            #expect(on.sites(in: "uart_putc").contains { $0.hitsServed > 0 }, "the scribbles hit a live patch: \(report)")
        }
        switch target {
        case .implantData, .ringHint:
            #expect(stop == offStop)
            #expect(on.output == off.output, "\(report)")
        case .ringSlots:
            // Intermittent: only a write that lands between a stub's publish and the consumer's read loses anything.
            withKnownIssue("ring slot words are guest memory: a write over a published slot loses or replaces the byte DMP put there",
                           isIntermittent: true) {
                #expect(stop == offStop)
                #expect(on.output == off.output)
            }
        }
    }
}
