import DMP
import Glibc
import Logging
import Synchronization
import Testing
import VMMKit
import VMMKitTesting

// Verification judges each site of a function copy on its own (DESIGN.md, DMP step 7), with the mock backend: a
// copy of `g` serves two port writes; the test charges one site fallbacks from its body in the copy (exits scripted
// at the copy's address, as the body's original instruction would exit) and writes the other's hit counter (as
// its body would count served accesses), then runs a verification pass.

private let base: UInt64 = 0x10_0000
/// g (0x100000, 9 bytes): `mov edx, 0x3f8` (the copy's entry), `out dx, al` (site A, port 0x3f8),
/// `out 0x80, al` (site B, port 0x80), `ret`.
private let code: [UInt8] = [0xba, 0xf8, 0x03, 0x00, 0x00, 0xee, 0xe6, 0x80, 0xc3]
private let siteA = base + 5, siteB = base + 6
private let exitA = VMExit.io(PortIO(port: 0x3f8, size: 1, direction: .write, value: 0x41))
private let exitB = VMExit.io(PortIO(port: 0x80, size: 1, direction: .write, value: 0x42))

/// A VM running the scripted guest with DMP (verification driven by the test), until the copy of `g` serves both sites.
private final class SiteUndoRun: @unchecked Sendable {
    static let threshold = 8
    let mock = MockHypervisor()
    let vm: VirtualMachine
    let dmp: DMPMiddleware
    let thr = DiscardingDevice(), post = DiscardingDevice()

    init(initialBackoff: Int = 4, maximumUndos: Int = 3) throws {
        vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        try vm.bus.attach(thr, ports: 0x3f8..<0x400)
        try vm.bus.attach(post, ports: 0x80..<0x81)
        _ = try X86Boot.load(.flat(code + [UInt8](repeating: 0x90, count: 0x1000 - code.count), loadAddress: base), into: vm)
        let v = try #require(mock.vcpu(0))
        v.currentRegisters.rip = siteA
        v.currentRegisters.rdx = 0x3f8
        var c = DMPConfiguration()
        c.threshold = SiteUndoRun.threshold
        c.verifyWindowAccesses = 8
        c.verifyLosingWindows = 1
        c.initialBackoff = initialBackoff
        c.maximumUndos = maximumUndos
        c.symbols = SymbolTable([GuestSymbol(name: "g", address: base, size: UInt64(code.count), isFunction: true)])
        c.codeRanges = [GuestRange(start: GuestAddress(base), size: 0x1000)]
        var logger = Logger(label: "test.dmp.siteundo")
        logger.logLevel = .critical
        dmp = DMPMiddleware.install(on: vm, rings: nil, configuration: c, logger: logger)
        // Both sites exit until A is hot (B, one exit behind, is its sibling): one copy serves both.
        var steps: [MockStep] = []
        for _ in 0..<SiteUndoRun.threshold { steps += [.jump(to: siteA), .access(exitA, length: 1), .access(exitB, length: 2)] }
        try run(steps)
        try #require(row(siteA)?.state == .patched && row(siteB)?.state == .patched, "\(dmp.report())")
        // The guest runs at CPL0, where a patch first goes through an A/B trial (RateTrial), which the mock cannot
        // time: the trial is taken as paid, and the sites' windows open.
        dmp.testSeam.concludeTrials()
        // Verification looks at patches 50 ms old or older.
        usleep(60_000)
    }

    func run(_ steps: [MockStep]) throws {
        try #require(mock.vcpu(0)).script(steps)
        #expect(try vm.run() == .halted)
    }

    /// `n` accesses of the site at `original` that exit from its body in the copy (its enable word clear, or its fast
    /// path not serving): charged to the site as fallbacks.
    func fallbacks(_ n: Int, at original: UInt64, _ exit: VMExit) throws {
        let at = try #require(dmp.testSeam.copyAddress(of: original), "no live copy holds \(hex(original))")
        try run((0..<n).flatMap { _ in [MockStep.jump(to: at), .access(exit, length: 1)] })
    }

    /// Sets the hit counter of the site at `original` to `hits` (what its body counts when it serves).
    func served(_ hits: UInt64, at original: UInt64) throws {
        let site = try #require(row(original)?.site)
        let counter = try #require(dmp.testSeam.hitCounters[site], "no hit counter for \(site)")
        try vm.memory.write(hits, at: counter)
    }

    func row(_ instruction: UInt64) -> PatchSite? { dmp.report().first { $0.instructionAddress == instruction } }

    var guestCode: [UInt8] { (try? vm.memory.readBytes(at: GuestAddress(base), count: code.count)) ?? [] }
}

private func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

@Suite("Verification of one site of a function copy (mock backend)")
struct SiteUndoTests {
    @Test("a losing site of a copy is turned off alone (its grant revoked, the copy and the paying site stay), turned on again after back-off, off again with twice the back-off; unpatchAll restores everything")
    func losingSiteOffAlone() throws {
        let r = try SiteUndoRun(initialBackoff: 4, maximumUndos: 3)
        #expect(r.thr.granted == 1 && r.post.granted == 1)
        let patched = r.guestCode
        #expect(patched != code)
        try r.served(100, at: siteB)
        try r.fallbacks(16, at: siteA, exitA)
        r.dmp.testSeam.verify()
        var a = try #require(r.row(siteA)), b = try #require(r.row(siteB))
        #expect(a.state == .disabled && a.state.rawValue == "undone (did not pay)", "\(a)")
        #expect(a.turnedOff == 1 && a.exitsWhilePatched == 16, "\(a)")
        let why = a.refusal?.reason ?? ""
        #expect(a.refusal?.stage == .verify && why.contains("slower with the patch: 1.00 exits per access")
                && why.contains("turned off alone, the copy of g serves its other sites on")
                && why.contains("turned on again after 4 more of its exits"), "\(why)")
        #expect(b.state == .patched && b.refusal == nil && b.hitsServed == 100 && b.windowsJudged == 1, "\(b)")
        #expect(r.thr.granted == 0 && r.post.granted == 1, "A's grant revoked, B's kept")
        #expect(r.guestCode == patched, "the copy stays in place")
        #expect(DMPReport.text(r.dmp.report()).contains("undone (did not pay): verify: "))

        // Three more of its exits: the back-off is not over.
        try r.fallbacks(3, at: siteA, exitA)
        r.dmp.testSeam.verify()
        #expect(r.row(siteA)?.state == .disabled && r.thr.granted == 0)
        // The fourth: the device grants the fast path again, with a fresh window.
        try r.fallbacks(1, at: siteA, exitA)
        r.dmp.testSeam.verify()
        a = try #require(r.row(siteA))
        #expect(a.state == .patched && a.refusal == nil && a.turnedOff == 1, "\(a)")
        #expect(r.thr.granted == 1)

        // Losing again: off again, the back-off doubled.
        try r.served(200, at: siteB)
        try r.fallbacks(16, at: siteA, exitA)
        r.dmp.testSeam.verify()
        a = try #require(r.row(siteA)); b = try #require(r.row(siteB))
        #expect(a.state == .disabled && a.turnedOff == 2, "\(a)")
        #expect(a.refusal?.reason.contains("turned on again after 8 more of its exits") == true, "\(String(describing: a.refusal))")
        #expect(b.state == .patched && b.windowsJudged == 2, "\(b)")
        #expect(r.thr.granted == 0 && r.post.granted == 1)

        // unpatchAll takes the copy out, with the site that is off.
        #expect(r.dmp.unpatchAll() == 1)
        #expect(r.guestCode == code)
        #expect(r.dmp.testSeam.patcher.guardedPages.isEmpty)
        #expect(r.thr.granted == 0 && r.post.granted == 0)
        #expect(r.dmp.report().allSatisfy { $0.state == .undone }, "\(r.dmp.report())")
    }

    @Test("a site undone as often as maximumUndos allows stays off; when the copy's last paying site loses too, the copy is undone whole")
    func wholeCopyLoses() throws {
        let r = try SiteUndoRun(initialBackoff: 4, maximumUndos: 1)
        try r.served(100, at: siteB)
        try r.fallbacks(16, at: siteA, exitA)
        r.dmp.testSeam.verify()
        let a = try #require(r.row(siteA))
        #expect(a.state == .disabled && a.refusal?.reason.contains("never turned on again") == true, "\(a)")
        try r.fallbacks(64, at: siteA, exitA)
        r.dmp.testSeam.verify()
        #expect(r.row(siteA)?.state == .disabled && r.thr.granted == 0, "no back-off ends")
        // B stops paying: every site of the copy lost or is off.
        try r.fallbacks(16, at: siteB, exitB)
        r.dmp.testSeam.verify()
        let b = try #require(r.row(siteB))
        #expect(b.state == .undone, "\(b)")
        #expect(b.refusal?.reason.contains("no other site of the copy pays (1 others, 1 of them off)") == true,
                "\(String(describing: b.refusal))")
        #expect(r.row(siteA)?.state == .undone)
        #expect(r.guestCode == code)
        #expect(r.dmp.testSeam.patcher.guardedPages.isEmpty)
        #expect(r.thr.granted == 0 && r.post.granted == 0)
    }

    @Test("a losing site whose copy's other site served nothing undoes the copy whole, as before")
    func noPayingSibling() throws {
        let r = try SiteUndoRun()
        try r.fallbacks(16, at: siteA, exitA)
        r.dmp.testSeam.verify()
        let a = try #require(r.row(siteA)), b = try #require(r.row(siteB))
        #expect(a.state == .undone && b.state == .undone, "\(a) \(b) exits \(a.exitsWhilePatched) windows \(a.windowsJudged) \(String(describing: a.lastWindowCost))")
        #expect(a.refusal?.reason.contains("no other site of the copy pays (1 others, 0 of them off)") == true,
                "\(String(describing: a.refusal))")
        #expect(r.guestCode == code)
        #expect(r.thr.granted == 0 && r.post.granted == 0)
    }
}

@Suite("Back-off after an undo")
struct BackOffTests {
    @Test("at the largest initialBackoff (2^40) a losing site is turned off with that back-off, no overflow, and stays off")
    func largestBackoff() throws {
        let r = try SiteUndoRun(initialBackoff: DMPConfiguration.maximumBackoff, maximumUndos: 3)
        #expect(r.dmp.configurationError == nil)
        try r.served(100, at: siteB)
        try r.fallbacks(16, at: siteA, exitA)
        r.dmp.testSeam.verify()
        let a = try #require(r.row(siteA))
        #expect(a.state == .disabled && a.refusal?.reason.contains("turned on again after 1099511627776 more of its exits") == true,
                "\(a)")
        try r.fallbacks(16, at: siteA, exitA)
        r.dmp.testSeam.verify()
        #expect(r.row(siteA)?.state == .disabled && r.thr.granted == 0)
    }

    @Test("the back-off starts at the first look after the undo, lasts its exits, and never ends after maximumUndos")
    func backOffOver() {
        var r = SiteRecord(report: PatchSite(site: ExitSite(rip: 1, kind: .io, address: 0x3f8, size: 1, direction: .write)))
        r.retryAtExits = -100
        let first = r.backOffOver(atExits: 50)
        #expect(!first && r.retryAtExits == 150)
        let before = r.backOffOver(atExits: 149), at = r.backOffOver(atExits: 150)
        #expect(!before && at)
        r.retryAtExits = nil
        let never = r.backOffOver(atExits: Int.max)
        #expect(!never)
    }
}

extension SiteUndoTests {
    @Test("a guest write into the copy's guarded page undoes the copy; a site that was off because it did not pay keeps its back-off (one that paid is patched again when hot)")
    func guardedWriteKeepsOffSiteBackOff() throws {
        let r = try SiteUndoRun(initialBackoff: 1 << 20, maximumUndos: 3)
        // A served a window's worth before its fallbacks made it lose (108 accesses, 100 exits: 0.93 per access).
        try r.served(8, at: siteA)
        try r.served(100, at: siteB)
        try r.fallbacks(100, at: siteA, exitA)
        r.dmp.testSeam.verify()
        try #require(r.row(siteA)?.state == .disabled && r.row(siteB)?.state == .patched, "\(r.dmp.report())")
        // The guest rewrites g's last byte (the same `ret`): the copy is undone.
        try r.run([.guestStore(GuestAddress(base + 8), size: 1, value: 0xc3)])
        #expect(r.row(siteA)?.state == .undone && r.row(siteB)?.state == .undone, "\(r.dmp.report())")
        #expect(r.guestCode == code)
        // Both original instructions get hot again: B, which paid, is patched again; A waits out its back-off.
        var steps: [MockStep] = []
        for _ in 0..<(2 * SiteUndoRun.threshold) { steps += [.jump(to: siteA), .access(exitA, length: 1), .access(exitB, length: 2)] }
        try r.run(steps)
        let a = try #require(r.row(siteA)), b = try #require(r.row(siteB))
        #expect(b.state == .patched, "\(b)")
        #expect(a.state == .undone, "\(a)")
        #expect(r.thr.granted == 0 && r.post.granted == 1)
    }
}
