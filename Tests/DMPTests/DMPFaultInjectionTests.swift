import DMP
import Logging
import Synchronization
import Testing
import VMMKit
import VMMKitTesting

// DMPMiddleware when ioctls fail while it patches or unpatches (mock backend, injected errors).
//
// The guest: a loop whose hot instruction exits `threshold` times (`MockStep.access` then `.jump` back to it),
// with its code bytes in the mock's guest memory. A clean run records how many calls of each operation the
// patch (from the hot exit on) or the unpatch makes; then each of those calls, one at a time, fails. Whatever
// fails, the outcome is consistent: either the patch is in place (jump written, its pages guarded, the report
// says patched), or it is not (original bytes, no page guarded, the report and the log say why); never a
// crash, a hang, a half-written patch, or a guard left on a page nothing depends on.

/// Takes every write of its registers; grants a discard-write fast path for writes at offset 0 and counts the grants it holds.
final class DiscardingDevice: BusDevice, @unchecked Sendable {
    let name = "discard"
    private let grants = Mutex(FastPathGrants())
    func read(offset: UInt64, size: Int) -> UInt64 { 0 }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { .none }
    func grantFastPath(_ request: FastPathRequest, enableWord: FastPathEnableWord) -> FastPathDescription? {
        guard request.direction == .write, request.offset == 0 else { return nil }
        let d = FastPathDescription(.discardWrite, for: request)
        grants.withLock { $0.add(d, word: enableWord, exact: true) }
        return d
    }
    func revokeFastPath(_ enableWord: FastPathEnableWord) { grants.withLock { $0.remove(enableWord) } }
    /// The grants it holds now.
    var granted: Int { grants.withLock { $0.descriptions.count } }
}

/// A swift-log handler that keeps every message with its `reason` and `error` metadata.
final class FaultLog: LogHandler, @unchecked Sendable {
    private let entries = Mutex<[(message: String, detail: String)]>([])
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        let detail = (metadata ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        entries.withLock { $0.append((message.description, detail)) }
    }
    var all: [(message: String, detail: String)] { entries.withLock { $0 } }
    func details(_ message: String) -> [String] { all.filter { $0.message == message }.map(\.detail) }
}

/// The code of the scripted guest, loaded at 0x100000.
private let faultBase: UInt64 = 0x10_0000
private let faultCode: [UInt8] = [
    // f (0x100000, 10 bytes): an MMIO store of 7 bytes (an instruction stub).
    0x89, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40, // mov [0x40000000], eax
    0xeb, 0xf7,                               // jmp f
    0xf4,                                     // hlt
    0x90, 0x90, 0x90, 0x90, 0x90, 0x90,       // fill
    // g (0x100010, 7 bytes): a one-byte out in a sized function (a function copy).
    0xba, 0xf8, 0x03, 0x00, 0x00,             // mov edx, 0x3f8
    0xee,                                     // out dx, al
    0xc3,                                     // ret
]

/// One hot site of the scripted guest.
struct FaultScenario: Sendable, CustomStringConvertible {
    var name: String
    /// The hot instruction's address and length, the exit it causes.
    var site: UInt64
    var length: UInt8
    var exit: VMExit
    var description: String { name }

    static let stub = FaultScenario(name: "instruction stub (MMIO store)", site: faultBase, length: 7,
                                    exit: .mmio(MMIOAccess(address: GuestAddress(0x4000_0000), size: 4, direction: .write, value: 1)))
    static let copy = FaultScenario(name: "function copy (out)", site: faultBase + 0x15, length: 1,
                                    exit: .io(PortIO(port: 0x3f8, size: 1, direction: .write, value: 0x41)))
}

/// One run of the scripted guest with DMP, optionally with the `skip`-th call (from the hot exit on) of an
/// operation failing.
final class FaultRun: @unchecked Sendable {
    static let threshold = 8
    let mock = MockHypervisor()
    let vm: VirtualMachine
    let dmp: DMPMiddleware
    let log = FaultLog()
    /// The index in the call log of the first call made for the hot exit's handling.
    let hotCall = Box()
    var stop: Result<StopReason, VMError> = .success(.halted)
    let scenario: FaultScenario

    init(_ scenario: FaultScenario, failing op: MockOperation? = nil, skip: Int = 0, count: Int = 1, errno: Errno = .ioError) throws {
        self.scenario = scenario
        vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        let dev = DiscardingDevice()
        try vm.bus.attach(dev, ports: 0x3f8..<0x400)
        try vm.bus.attach(dev, mmio: GuestRange(start: GuestAddress(0x4000_0000), size: 0x1000))
        var code = faultCode
        code += [UInt8](repeating: 0x90, count: 0x1000 - code.count)
        _ = try X86Boot.load(.flat(code, loadAddress: faultBase), into: vm)
        let v = try #require(mock.vcpu(0))
        v.currentRegisters.rip = scenario.site
        v.currentRegisters.rdx = 0x3f8
        var steps: [MockStep] = []
        for _ in 0..<FaultRun.threshold { steps += [.access(scenario.exit, length: scenario.length), .jump(to: scenario.site)] }
        v.script(steps)
        // First in the chain: at the hot exit, before DMP sees it, note where the call log is and arm the fault.
        let exits = Box()
        let (mock, hotCall) = (mock, hotCall)
        vm.addExitHandler(ClosureExitHandler { (exit, _) throws(VMError) -> ExitResult in
            guard exit.kind == .io || exit.kind == .mmio else { return .pass }
            let n = exits.value.withLock { $0 = ($0 ?? 0) + 1; return $0 ?? 0 }
            if n == FaultRun.threshold {
                hotCall.value.withLock { $0 = mock.log.calls.count }
                if let op { mock.log.inject(errno, into: op, count: count, skipping: skip) }
            }
            return .pass
        })
        var c = DMPConfiguration()
        c.threshold = FaultRun.threshold
        c.verify = false
        c.symbols = SymbolTable([
            GuestSymbol(name: "f", address: faultBase, size: 10, isFunction: true),
            GuestSymbol(name: "g", address: faultBase + 0x10, size: 7, isFunction: true),
        ])
        c.codeRanges = [GuestRange(start: GuestAddress(faultBase), size: 0x1000)]
        let log = self.log
        dmp = DMPMiddleware.install(on: vm, rings: nil, configuration: c, logger: Logger(label: "test.dmp.faults") { _ in log })
    }

    /// Runs the script to its end (the guest halts) or to the error a failed `KVM_RUN` stops the VM with.
    func run() {
        do { stop = .success(try vm.run()) } catch { stop = .failure(error) }
    }

    /// The calls of `op` made from the hot exit on.
    func callsSinceHot(_ op: MockOperation) -> Int {
        let from = hotCall.value.withLock { $0 } ?? 0
        return mock.log.calls.dropFirst(from).filter { $0.operation == op }.count
    }

    /// The site's row in the report.
    var row: PatchSite? { dmp.report().first { $0.instructionAddress == scenario.site || $0.site.rip == scenario.site + UInt64(scenario.length) || $0.site.rip == scenario.site } }

    /// The guest's code bytes now.
    var code: [UInt8] { (try? vm.memory.readBytes(at: GuestAddress(faultBase), count: faultCode.count)) ?? [] }

    /// The pages the mock's slots hold read-only (what the guest sees guarded).
    var readOnlyPages: [UInt64] {
        guard let m = mock.vms.last else { return [] }
        var pages: [UInt64] = []
        for s in m.slots.values where s.flags.contains(.readOnly) {
            var p = s.range.start.rawValue
            while p < s.range.start.rawValue + s.range.size { pages.append(p); p += 0x1000 }
        }
        return pages.sorted()
    }

    /// The pages DMP's patcher counts as guarded.
    var guardedPages: [UInt64] { dmp.testSeam.patcher.guardedPages }

    /// Expects one of the two consistent outcomes; returns whether the patch is in place.
    @discardableResult
    func expectConsistent(_ what: String, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
        let patched = dmp.report().contains { $0.state == .patched }
        // The kernel's view, the memory's view and DMP's count of guards agree.
        let stranded = dmp.testSeam.patcher.strandedPages
        #expect(readOnlyPages == Array(Set(guardedPages + stranded)).sorted(),
                "\(what): read-only slots \(readOnlyPages.map(hex)) vs DMP's guards \(guardedPages.map(hex)) and stranded \(stranded.map(hex))",
                sourceLocation: sourceLocation)
        if !stranded.isEmpty {
            #expect(!log.details("guard left stranded").isEmpty, "\(what): stranded guards not logged", sourceLocation: sourceLocation)
        }
        #expect(vm.memory.protectedRanges.flatMap(pagesOf) == readOnlyPages, "\(what): GuestMemory's view", sourceLocation: sourceLocation)
        if patched {
            #expect(code != faultCode, "\(what): reported patched but the code is the original", sourceLocation: sourceLocation)
            #expect(guardedPages.contains(faultBase), "\(what): the patched page is not guarded", sourceLocation: sourceLocation)
            #expect(guardedPages.contains(X86Layout.implantArea.start.rawValue), "\(what): the implant code page is not guarded",
                    sourceLocation: sourceLocation)
        } else {
            #expect(code == faultCode, "\(what): not patched but the code changed", sourceLocation: sourceLocation)
            #expect(guardedPages.isEmpty, "\(what): guards left without a patch: \(guardedPages.map(hex))", sourceLocation: sourceLocation)
        }
        return patched
    }

    private func pagesOf(_ r: GuestRange) -> [UInt64] {
        stride(from: r.start.rawValue, to: r.start.rawValue + r.size, by: 0x1000).map { $0 }
    }
}

/// A number shared with a handler's closure.
final class Box: Sendable {
    let value = Mutex<Int?>(nil)
}

private func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// The operations a patch or an unpatch calls, in the mock's names.
private let patchOperations: [MockOperation] = [.getRegisters, .getSpecialRegisters, .getVCPUEvents, .run, .setUserMemoryRegion]

@Suite("DMPMiddleware under injected ioctl failures (mock backend)")
struct DMPFaultInjectionTests {
    @Test("a clean run patches the scripted site", arguments: [FaultScenario.stub, .copy])
    func clean(scenario: FaultScenario) throws {
        let r = try FaultRun(scenario)
        r.run()
        #expect((try? r.stop.get()) == .halted)
        let row = try #require(r.row, "\(r.dmp.report())")
        #expect(row.state == .patched, "\(row)")
        #expect(r.expectConsistent("clean"))
        #expect(r.dmp.unpatchAll() == 1)
        #expect(r.code == faultCode)
        #expect(r.guardedPages.isEmpty && r.readOnlyPages.isEmpty)
        #expect(r.mock.finish().isEmpty)
    }

    @Test("each ioctl of the patch failing in turn: patched whole or refused with the reason, never half",
          arguments: [FaultScenario.stub, .copy], patchOperations)
    func patchFaults(scenario: FaultScenario, op: MockOperation) throws {
        let clean = try FaultRun(scenario)
        clean.run()
        let calls = clean.callsSinceHot(op)
        #expect(calls > 0, "the patch makes no \(op.rawValue) call")
        for k in 0..<calls {
            let r = try FaultRun(scenario, failing: op, skip: k)
            r.run()
            let what = "\(scenario) \(op.rawValue) call \(k + 1) of \(calls) failing"
            #expect(r.mock.log.undeliveredFailures.isEmpty, "\(what): the fault was not delivered")
            let patched = r.expectConsistent(what)
            if !patched {
                if let row = r.row {
                    // Why is in the report and in the log.
                    let logged = r.log.details("refused")
                    if case .success = r.stop {
                        #expect(row.refusal != nil && !logged.isEmpty, "\(what): no reason given: \(row) log \(r.log.all)")
                    }
                } else {
                    // The fault hid the exit from DMP (its RIP could not be read): the site never became hot.
                    #expect(r.log.details("hot").isEmpty, "\(what): hot, but no row in the report")
                }
            }
            // Taking everything out afterwards leaves the original code and no guard.
            r.dmp.unpatchAll()
            #expect(r.code == faultCode, "\(what): unpatchAll left patched bytes")
            #expect(r.guardedPages.isEmpty && r.readOnlyPages.isEmpty, "\(what): unpatchAll left guards")
        }
    }

    @Test("slot changes failing twice in a row (the rollback fails too): guards no patch relies on are stranded, logged and lifted later",
          arguments: [FaultScenario.stub, .copy])
    func rollbackFaults(scenario: FaultScenario) throws {
        let clean = try FaultRun(scenario)
        clean.run()
        let calls = clean.callsSinceHot(.setUserMemoryRegion)
        for k in 0..<calls {
            let r = try FaultRun(scenario, failing: .setUserMemoryRegion, skip: k, count: 2)
            r.run()
            let what = "\(scenario) KVM_SET_USER_MEMORY_REGION calls \(k + 1) and \(k + 2) of \(calls) failing"
            r.expectConsistent(what)
            r.dmp.unpatchAll()
            #expect(r.code == faultCode, "\(what): unpatchAll left patched bytes")
            #expect(r.guardedPages.isEmpty && r.readOnlyPages.isEmpty && r.dmp.testSeam.patcher.strandedPages.isEmpty,
                    "\(what): unpatchAll left guards")
        }
    }

    @Test("each ioctl of an unpatch failing in turn: undone whole or kept whole with the reason logged, and a later unpatch finishes",
          arguments: [FaultScenario.stub, .copy], [MockOperation.getRegisters, .setUserMemoryRegion])
    func unpatchFaults(scenario: FaultScenario, op: MockOperation) throws {
        let clean = try FaultRun(scenario)
        clean.run()
        let before = clean.mock.log.calls.count
        clean.dmp.unpatchAll()
        let calls = clean.mock.log.calls.dropFirst(before).filter { $0.operation == op }.count
        #expect(calls > 0)
        for k in 0..<calls {
            let r = try FaultRun(scenario)
            r.run()
            try #require(r.row?.state == .patched)
            r.mock.log.inject(.ioError, into: op, skipping: k)
            r.dmp.unpatchAll()
            let what = "\(scenario) unpatch: \(op.rawValue) call \(k + 1) of \(calls) failing"
            #expect(r.mock.log.undeliveredFailures.isEmpty, "\(what): the fault was not delivered")
            if r.expectConsistent(what) {
                #expect(!r.log.details("undo failed").isEmpty, "\(what): kept without a word in the log")
                #expect(r.dmp.report().contains { $0.undoFailure != nil }, "\(what): kept without a word in the report")
                #expect(DMPReport.text(r.dmp.report()).contains("undo failed"), "\(what): the printed report does not say so")
            } else if op == .getRegisters {
                Issue.record("\(what): unpatched although the vCPUs' RIPs could not be checked")
            }
            r.dmp.unpatchAll()
            #expect(r.code == faultCode, "\(what): a second unpatchAll left patched bytes")
            #expect(r.guardedPages.isEmpty && r.readOnlyPages.isEmpty, "\(what): a second unpatchAll left guards")
            #expect(r.dmp.report().allSatisfy { $0.state != .patched })
        }
    }
}
