import Testing
import VMMKit
import VMMKitTesting

/// What a bracketing handler saw.
final class BracketLog: @unchecked Sendable {
    var before: UInt64?
    var after: Registers?
    var resolved: ResolvedSite?
    var reentries = 0
    var error: VMError?
    var flags: [Bool] = []
}

/// Serves the access through the rest of the chain, then completes it and records RIP before and after.
func bracketingHandler(_ log: BracketLog, resolve: Bool = false) -> ClosureExitHandler {
    ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
        switch exit {
        case .io, .mmio: break
        default: return .pass
        }
        if ctx.isCompletingAccess { log.reentries += 1; return .pass }
        log.before = try ctx.registers().rip
        let r = try ctx.forward(exit)
        if resolve { log.resolved = try ctx.resolveSite() }
        log.after = try ctx.completePendingAccess()
        return r
    }
}

let uartLSR = PortIO(port: 0x3fd, size: 1, direction: .read)
let uartTHR = PortIO(port: 0x3f8, size: 1, direction: .write, value: 0x41)
let mmioLoad = MMIOAccess(address: GuestAddress(0xd000_0000), size: 4, direction: .read)
let mmioStore = MMIOAccess(address: GuestAddress(0xd000_0000), size: 4, direction: .write, value: 7)

@Suite("Completing the pending access, RIP models, sites")
struct CompletionTests {
    func vm(_ mock: MockHypervisor, _ model: MockRIPModel, rip: UInt64 = 0x10_0000) throws -> (VirtualMachine, MockVCPU, RecordingDevice) {
        let vm = try makeVM(mock)
        let dev = RecordingDevice(readValue: 0x1122_3344)
        try vm.bus.attach(dev, ports: 0x3f8..<0x400)
        try vm.bus.attach(dev, mmio: GuestRange(start: GuestAddress(0xd000_0000), size: 0x1000))
        let v = try #require(mock.vcpu(0))
        v.ripModel = model
        v.currentRegisters.rip = rip
        return (vm, v, dev)
    }

    @Test("bracketing gives the instruction's length where RIP is on it, and no movement where it is past, on both RIP models",
          arguments: [
            (MockRIPModel.pvm, VMExit.io(uartLSR), UInt8(1), true), (.pvm, .io(uartTHR), 1, false),
            (.pvm, .mmio(mmioLoad), 6, true), (.pvm, .mmio(mmioStore), 7, false),
            (.hardware, .io(uartLSR), 1, true), (.hardware, .io(uartTHR), 2, true),
            (.hardware, .mmio(mmioLoad), 6, true), (.hardware, .mmio(mmioStore), 7, false),
          ])
    func bracketing(model: MockRIPModel, exit: VMExit, length: UInt8, on: Bool) throws {
        let mock = MockHypervisor()
        let (vm, v, _) = try vm(mock, model)
        let log = BracketLog()
        vm.addExitHandler(bracketingHandler(log, resolve: true))
        v.script([.access(exit, length: length, destination: .rbx)])
        #expect(try vm.run() == .halted)
        let before = try #require(log.before), after = try #require(log.after)
        let start: UInt64 = 0x10_0000
        #expect(before == (on ? start : start + UInt64(length)))
        #expect(after.rip == start + UInt64(length), "RIP past the instruction after completion")
        let site = try #require(log.resolved)
        #expect(site.position == (on ? .onInstruction(length: Int(length)) : .pastInstruction))
        #expect(site.physicalRIP == GuestAddress(before), "paging off: physical = linear")
        #expect(site.instructionStart == (on ? GuestAddress(start) : nil))
        if case .mmio(let m) = exit, m.direction == .read {
            #expect(after.rbx == 0x1122_3344, "the load landed in the destination register")
        }
        if case .io(let io) = exit, io.direction == .read {
            #expect(after.rax & 0xff == 0x49, "the in landed in AL (the device answers 0x11223344 + offset 5)")
        }
        #expect(v.runCount == 2, "the completion ran no guest code (one run for the exit, one for the final halt)")
    }

    @Test("setRegisters during a pending read is refused with a typed error; after completion it works and the value stays")
    func setRegistersRefused() throws {
        let mock = MockHypervisor()
        let (vm, v, _) = try vm(mock, .pvm)
        let refused = BracketLog()
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .mmio = exit else { return .pass }
            ctx.completeRead(0x55)
            var r = try ctx.registers()
            r.rcx = 9
            do throws(VMError) { try ctx.setRegisters(r) } catch { refused.error = error }
            refused.flags.append(ctx.hasPendingAccess)
            var after = try ctx.completePendingAccess()
            refused.flags.append(ctx.hasPendingAccess)
            after.rcx = 9
            try ctx.setRegisters(after)
            return .handled
        })
        v.script([.access(.mmio(mmioLoad), length: 3, destination: .rbx)])
        #expect(try vm.run() == .halted)
        guard case .accessPending(let vcpu, let exit)? = refused.error else {
            Issue.record("expected accessPending, got \(String(describing: refused.error))"); return
        }
        #expect(vcpu == 0 && exit == .mmio(mmioLoad))
        #expect(refused.flags == [true, false], "pending before the completion, not after")
        #expect(v.currentRegisters.rbx == 0x55 && v.currentRegisters.rcx == 9 && v.currentRegisters.rip == 0x10_0003)
    }

    @Test("the PVM model drops a load when registers are written back before completion; the hardware model keeps it",
          arguments: [(MockRIPModel.pvm, UInt64(0)), (.hardware, 0x55)])
    func writeBackDrop(model: MockRIPModel, expected: UInt64) throws {
        let mock = MockHypervisor()
        let (vm, v, _) = try vm(mock, model)
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .mmio = exit else { return .pass }
            ctx.completeRead(0x55)
            // What setRegisters refuses to do: a raw write-back through the backend.
            try? v.setRegisters(v.currentRegisters)
            return .handled
        })
        v.script([.access(.mmio(mmioLoad), length: 3, destination: .rbx)])
        #expect(try vm.run() == .halted)
        #expect(v.currentRegisters.rbx == expected)
        #expect(v.currentRegisters.rip == 0x10_0003, "RIP moves either way")
    }

    @Test("further exits of a split string access are dispatched through the whole chain until the instruction completes")
    func continuations() throws {
        let mock = MockHypervisor()
        let (vm, v, dev) = try vm(mock, .pvm)
        let log = BracketLog()
        vm.addExitHandler(bracketingHandler(log))
        let outs = PortIO(port: 0x3f8, size: 1, count: 2, direction: .write)
        v.script([.access(.io(outs), length: 2, data: [1, 2])]
                 + (1..<100).map { i in MockStep.continuation(.io(outs), data: [UInt64(2 * i + 1), UInt64(2 * i + 2)]) })
        #expect(try vm.run() == .halted)
        #expect(dev.writes.map(\.value) == (1...200).map(UInt64.init), "every element reached the device once, in order")
        #expect(log.reentries == 99, "the asking handler saw each further exit, flagged")
        #expect(log.after?.rip == 0x10_0002, "RIP past the instruction once it completed")
        #expect(vm.statistics()[.io] == 100)
        #expect(v.remainingSteps.isEmpty)
    }

    @Test("a VM stopped by the handler of the first part still completes a long split access (no fixed bound)")
    func stopCompletesLongString() throws {
        let mock = MockHypervisor()
        let (vm, v, dev) = try vm(mock, .pvm)
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .io = exit, !ctx.isCompletingAccess else { return .pass }
            _ = try ctx.forward(exit)
            return .stopVM(.stopped)
        })
        let part = MockStep.continuation(.io(PortIO(port: 0x3f8, size: 1, count: 1, direction: .write, value: 7)))
        v.script([.access(.io(PortIO(port: 0x3f8, size: 1, count: 1, direction: .write, value: 7)), length: 2)]
                 + Array(repeating: part, count: 300))
        #expect(try vm.run() == .stopped)
        #expect(dev.writes.count == 301)
        #expect(v.remainingSteps.isEmpty && !v.hasPendingAccess)
    }

    @Test("a stop request ends an endless completion early, leaving the rest pending")
    func stopEndsEndlessCompletion() throws {
        let mock = MockHypervisor()
        let (vm, v, dev) = try vm(mock, .pvm)
        let log = BracketLog()
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .io = exit else { return .pass }
            if ctx.isCompletingAccess {
                log.reentries += 1
                if log.reentries == 5 { ctx.vm.stop() }
                return .pass
            }
            _ = try ctx.forward(exit)
            log.after = try ctx.completePendingAccess()
            log.flags.append(ctx.hasPendingAccess)
            return .handled
        })
        let part = MockStep.continuation(.io(PortIO(port: 0x3f8, size: 1, count: 1, direction: .write, value: 7)))
        v.script([.access(.io(PortIO(port: 0x3f8, size: 1, count: 1, direction: .write, value: 7)), length: 2)]
                 + Array(repeating: part, count: 10_000))
        #expect(try vm.run() == .stopped)
        #expect(log.flags == [true], "the completion was cut short by the stop")
        #expect(dev.writes.count < 20)
        #expect(v.remainingSteps.count > 9_000)
    }

    @Test("a failing completion run surfaces its error to the handler and ends the VM with it")
    func completionErrorSurfaces() throws {
        let mock = MockHypervisor()
        let (vm, v, _) = try vm(mock, .pvm)
        let log = BracketLog()
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .io = exit else { return .pass }
            mock.log.inject(.badAddress, into: .run)
            do throws(VMError) { _ = try ctx.completePendingAccess() } catch { log.error = error; throw error }
            return .handled
        })
        v.script([.access(.io(uartLSR), length: 1)])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.backend(let b) = e else { return false }
            return b.operation == "KVM_RUN" && b.errno == .badAddress
        }
        guard case .backend? = log.error else { Issue.record("the handler saw no error"); return }
    }

    @Test("completePendingAccess from a further exit's handler is a typed error, not a recursion")
    func nestedCompletionRefused() throws {
        let mock = MockHypervisor()
        let (vm, v, _) = try vm(mock, .pvm)
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .io = exit else { return .pass }
            _ = try ctx.forward(exit)
            _ = try ctx.completePendingAccess()
            return .handled
        })
        v.script([.access(.io(uartTHR), length: 1), .continuation(.io(uartTHR))])
        #expect {
            try vm.run()
        } throws: { e in
            guard case VMError.invalidState(let s) = e else { return false }
            return s.contains("completePendingAccess")
        }
    }

    @Test("a stop asked for by a further exit's handler takes effect after the asking handler returns")
    func deferredStop() throws {
        let mock = MockHypervisor()
        let (vm, v, dev) = try vm(mock, .pvm)
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .io = exit else { return .pass }
            if ctx.isCompletingAccess { _ = try ctx.forward(exit); return .stopVM(.guestExit(status: 9)) }
            _ = try ctx.forward(exit)
            _ = try ctx.completePendingAccess()
            return .handled
        })
        v.script([.access(.io(uartTHR), length: 1), .continuation(.io(uartTHR)), .continuation(.io(uartTHR)), debugExit3])
        #expect(try vm.run() == .guestExit(status: 9))
        #expect(dev.writes.count == 3, "the completion still finished the instruction")
        #expect(v.remainingSteps.count == 1)
    }

    @Test("a site resolves through the guest's page tables under its CR3 (PCID masked), cached per CR3 and page")
    func resolveThroughPaging() throws {
        let mock = MockHypervisor()
        let rip: UInt64 = 0x7f12_3456_7abc
        let (vm, v, _) = try vm(mock, .pvm, rip: rip)
        // Four-level tables at 0x10000.. mapping the page of `rip` to 0x5000 (then 0x6000).
        let m = vm.memory
        let idx: @Sendable (UInt64) -> UInt64 = { level in (rip >> (12 + 9 * (level - 1))) & 0x1ff }
        try m.write(UInt64(0x11000 | 3), at: GuestAddress(0x10000 + idx(4) * 8))
        try m.write(UInt64(0x12000 | 3), at: GuestAddress(0x11000 + idx(3) * 8))
        try m.write(UInt64(0x13000 | 3), at: GuestAddress(0x12000 + idx(2) * 8))
        try m.write(UInt64(0x5000 | 3), at: GuestAddress(0x13000 + idx(1) * 8))
        var s = SpecialRegisters()
        s.cr0 = 0x8000_0011; s.cr4 = 0x20 | 0x20000; s.efer = 0x500; s.cr3 = 0x10000 | 0x5
        s.cs.l = true
        try v.setSpecialRegisters(s)
        let sites = SiteLog()
        vm.addExitHandler(ClosureExitHandler { (exit, ctx) throws(VMError) -> ExitResult in
            guard case .io = exit else { return .pass }
            let r = try ctx.forward(exit)
            sites.append(try ctx.resolveSite())
            if sites.count == 1 {
                // Remap the page: the cached translation stays until invalidated.
                do throws(GuestMemoryError) { try ctx.memory.write(UInt64(0x6000 | 3), at: GuestAddress(0x13000 + idx(1) * 8)) } catch { throw .memory(error) }
            }
            if sites.count == 2 { ctx.invalidateSiteTranslations() }
            return r
        })
        let step = MockStep.access(.io(uartTHR), length: 0)
        v.script([step, step, step])
        #expect(try vm.run() == .halted)
        #expect(sites.all.map(\.addressSpace) == [0x10000, 0x10000, 0x10000])
        #expect(sites.all.map(\.physicalRIP) == [GuestAddress(0x5abc), GuestAddress(0x5abc), GuestAddress(0x6abc)])
        #expect(sites.all.allSatisfy { $0.site.rip == rip && $0.site.kind == .io && $0.site.address == 0x3f8 })
    }
}

final class SiteLog: @unchecked Sendable {
    var all: [ResolvedSite] = []
    var count: Int { all.count }
    func append(_ s: ResolvedSite) { all.append(s) }
}

@Suite("Exit site table and exit values")
struct ExitSiteTableTests {
    func site(_ rip: UInt64, _ port: UInt64 = 0x3f8) -> ExitSite {
        ExitSite(rip: rip, kind: .io, address: port, size: 1, direction: .write)
    }

    @Test("counts per site, returns the new count, and tells sites apart by every field")
    func counting() {
        let t = ExitSiteTable(capacity: 64)
        #expect(t.record(site(0x1000)) == 1)
        #expect(t.record(site(0x1000)) == 2)
        #expect(t.record(site(0x1000, 0x3fd)) == 1)
        #expect(t.record(ExitSite(rip: 0x1000, kind: .io, address: 0x3f8, size: 1, direction: .read)) == 1)
        #expect(t.record(ExitSite(rip: 0x1000, kind: .mmio, address: 0x3f8, size: 1, direction: .write)) == 1)
        #expect(t.count(of: site(0x1000)) == 2)
        #expect(t.count == 4 && t.overflow == 0)
        #expect(Set(t.sites.map(\.site)) == [site(0x1000), site(0x1000, 0x3fd),
                                             ExitSite(rip: 0x1000, kind: .io, address: 0x3f8, size: 1, direction: .read),
                                             ExitSite(rip: 0x1000, kind: .mmio, address: 0x3f8, size: 1, direction: .write)])
        t.removeAll()
        #expect(t.count == 0 && t.sites.isEmpty && t.count(of: site(0x1000)) == 0)
    }

    @Test("stays bounded: beyond its capacity exits are counted as overflow, and known sites still count")
    func bounded() {
        let t = ExitSiteTable(capacity: 100)
        for i in 0..<10_000 { t.record(site(UInt64(i) * 4096)) }
        #expect(t.count == 100)
        #expect(t.overflow == 9_900)
        let kept = t.sites.map(\.site)
        #expect(kept.count == 100)
        if let s = kept.first { #expect(t.record(s) == 2) }
    }

    @Test("VMExit carries no reference-counted payload")
    func exitIsPOD() {
        #expect(_isPOD(VMExit.self))
        #expect(_isPOD(InternalError.self))
        let e = VMExit.hypercall(nr: 12, args: ExitWords([1, 2, 3, 4, 5, 6]))
        guard case .hypercall(_, let args) = e else { Issue.record("not a hypercall"); return }
        #expect(Array(args) == [1, 2, 3, 4, 5, 6])
        #expect(InternalError(suberror: 1, data: Array(0..<20)).data == Array(0..<6), "capped at 6 words inline")
        #expect(MemoryLayout<VMExit>.size <= 64, "an exit is copied with a few moves")
    }

    @Test("site statistics through the VM use the table, per vCPU, and merge")
    func statisticsThroughVM() throws {
        let mock = MockHypervisor()
        var c = VMConfiguration(memorySize: 4 << 20, vcpuCount: 1)
        c.collectSiteStatistics = true
        let vm = try VirtualMachine(backend: mock, configuration: c)
        try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
        let v = try #require(mock.vcpu(0))
        v.currentRegisters.rip = 0x2000
        v.script([.access(.io(uartTHR), length: 1), .access(.io(uartTHR), length: 1), out(0xf4, 0)])
        #expect(try vm.run() == .guestExit(status: 0))
        let s = vm.statistics()
        #expect(s.sites[ExitSite(rip: 0x2001, kind: .io, address: 0x3f8, size: 1, direction: .write)] == 1)
        #expect(s.sites[ExitSite(rip: 0x2002, kind: .io, address: 0x3f8, size: 1, direction: .write)] == 1)
        #expect(s[.io] == 3 && s.total == 3)
    }
}
