@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Addresses the bodies are checked at: the patched site, the stub, the data page and a ring.
enum StubLayout {
    static let site: UInt64 = 0x40_1000
    static let stub: UInt64 = 0x50_0000
    static let enable: UInt64 = 0x50_1000
    static let hits: UInt64 = 0x50_1008
    static let slot: UInt64 = 0x50_1010
    static let ring: UInt64 = 0x50_2000
    static let otherRing: UInt64 = 0x50_4000
    static let wideTarget: UInt64 = 0xd000_0040

    static func route(_ target: FastPathRoute.Target, width: Int, _ direction: AccessDirection, _ kind: FastPathKind,
                      index: UInt64 = 0, ring: RingMapping? = nil, pending: [RingMapping] = []) -> FastPathRoute {
        FastPathRoute(target: target, width: width, direction: direction, kind: kind,
                      enableWord: enable + 0x100 * index, hitCounter: hits + 0x100 * index, ring: ring,
                      slot: slot + 0x100 * index, pendingRings: pending)
    }

    static let asyncRing = RingMapping(base: ring, slotCount: 8, synchronous: false)
    static let syncRing = RingMapping(base: ring, slotCount: 512, synchronous: true, kick: .port(0x704))
    static let kickedRing = RingMapping(base: ring, slotCount: 512, synchronous: false, kick: .port(0x704))
    static let countedSyncRing = RingMapping(base: ring, slotCount: 512, synchronous: true, kick: .port(0x704), waitCounter: hits + 8)
}

/// A body shape: an instruction and the routes it serves.
struct BodyCase: CustomStringConvertible, Sendable {
    var name: String
    var bytes: [UInt8]
    var routes: [FastPathRoute]
    var description: String { name }
}

let bodyCases: [BodyCase] = {
    typealias L = StubLayout
    return [
        BodyCase(name: "in al, dx: constant (UART LSR)", bytes: [0xec], routes: [L.route(.port(0x3fd), width: 1, .read, .constantRead(0x60))]),
        BodyCase(name: "in al, dx: constant while the THR ring is empty", bytes: [0xec],
                 routes: [L.route(.port(0x3fd), width: 1, .read, .constantRead(0x60), pending: [L.asyncRing])]),
        BodyCase(name: "in eax, 0x70: shared slot", bytes: [0xe5, 0x70], routes: [L.route(.port(0x70), width: 4, .read, .sharedSlotRead(slot: 0))]),
        BodyCase(name: "in ax, dx: two ports", bytes: [0x66, 0xed], routes: [
            L.route(.port(0x1f0), width: 2, .read, .constantRead(0x1234)),
            L.route(.port(0x1f2), width: 2, .read, .sharedSlotRead(slot: 1), index: 1),
        ]),
        BodyCase(name: "out dx, al: ring append (UART THR)", bytes: [0xee], routes: [L.route(.port(0x3f8), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: L.asyncRing)]),
        BodyCase(name: "out dx, al: ring append that kicks a sleeping poller", bytes: [0xee],
                 routes: [L.route(.port(0x3f8), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: L.kickedRing)]),
        BodyCase(name: "out 0x80, al: discard", bytes: [0xe6, 0x80], routes: [L.route(.port(0x80), width: 1, .write, .discardWrite)]),
        BodyCase(name: "out dx, ax: discard or ring", bytes: [0x66, 0xef], routes: [
            L.route(.port(0x80), width: 2, .write, .discardWrite),
            L.route(.port(0x3f8), width: 2, .write, .ringAppend(ring: 0, mode: .asynchronous), index: 1, ring: L.asyncRing),
        ]),
        BodyCase(name: "mov [rsi+0x40], eax: synchronous ring with a kick (doorbell)", bytes: [0x89, 0x46, 0x40],
                 routes: [L.route(.memory(L.wideTarget), width: 4, .write, .ringAppend(ring: 1, mode: .synchronous), ring: L.syncRing)]),
        BodyCase(name: "mov [rsi+0x40], eax: synchronous ring with a kick and a wait counter", bytes: [0x89, 0x46, 0x40],
                 routes: [L.route(.memory(L.wideTarget), width: 4, .write, .ringAppend(ring: 1, mode: .synchronous), ring: L.countedSyncRing)]),
        BodyCase(name: "mov dword [rdi+rcx*4+8], 7: ring", bytes: [0xc7, 0x44, 0x8f, 0x08, 0x07, 0x00, 0x00, 0x00],
                 routes: [L.route(.memory(0x10_0000), width: 4, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: L.asyncRing)]),
        BodyCase(name: "mov [rbx], ah: ring from a high byte", bytes: [0x88, 0x23],
                 routes: [L.route(.memory(0x10_0000), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: L.asyncRing)]),
        BodyCase(name: "mov eax, [rsi+8]: constant at a wide address", bytes: [0x8b, 0x46, 0x08],
                 routes: [L.route(.memory(L.wideTarget), width: 4, .read, .constantRead(0xfeed))]),
        BodyCase(name: "mov rax, [rsp+8]: slot (rsp-based)", bytes: [0x48, 0x8b, 0x44, 0x24, 0x08],
                 routes: [L.route(.memory(0x7000), width: 8, .read, .sharedSlotRead(slot: 0))]),
        BodyCase(name: "movzx ecx, byte [rip+0x100]: constant", bytes: [0x0f, 0xb6, 0x0d, 0x00, 0x01, 0x00, 0x00],
                 routes: [L.route(.memory(StubLayout.site + 7 + 0x100), width: 1, .read, .constantRead(0x80))]),
        BodyCase(name: "movsx r9, word [r8]: slot", bytes: [0x4d, 0x0f, 0xbf, 0x08],
                 routes: [L.route(.memory(0x1000), width: 2, .read, .sharedSlotRead(slot: 0))]),
        BodyCase(name: "mov eax, [rcx+4]: shared slot while the doorbell's ring is empty (c-doorbell-cpl3 STATUS)", bytes: [0x8b, 0x41, 0x04],
                 routes: [L.route(.memory(0xd000_0004), width: 4, .read, .sharedSlotRead(slot: 0), pending: [L.asyncRing])]),
        BodyCase(name: "mov eax, [rsi+4]: shared slot (doorbell-cpl3 STATUS)", bytes: [0x8b, 0x46, 0x04],
                 routes: [L.route(.memory(0xd000_0004), width: 4, .read, .sharedSlotRead(slot: 0))]),
        BodyCase(name: "movsxd rdx, [rbx+4]: shared slot", bytes: [0x48, 0x63, 0x53, 0x04],
                 routes: [L.route(.memory(0xd000_0004), width: 4, .read, .sharedSlotRead(slot: 0))]),
        BodyCase(name: "movsxd rdx, [rbp-4]: constant", bytes: [0x48, 0x63, 0x55, 0xfc],
                 routes: [L.route(.memory(0x1000), width: 4, .read, .constantRead(0x8000_0000))]),
        BodyCase(name: "in eax, dx: TSC counter (PM timer)", bytes: [0xed],
                 routes: [L.route(.port(0x608), width: 4, .read, .tscCounter(TSCCounter(multiplier: 0x2_5a1c_0000, shift: 36, wrapMask: 0xff_ffff)))]),
        BodyCase(name: "mov rax, [rsi+0xf0]: TSC counter (HPET), shift past 64", bytes: [0x48, 0x8b, 0x86, 0xf0, 0x00, 0x00, 0x00],
                 routes: [L.route(.memory(0xfed0_00f0), width: 8, .read, .tscCounter(TSCCounter(multiplier: 1 << 63, shift: 70, offset: 1 << 40)))]),
        BodyCase(name: "movsx ecx, word [rdi]: TSC counter", bytes: [0x0f, 0xbf, 0x0f],
                 routes: [L.route(.memory(0x1000), width: 2, .read, .tscCounter(TSCCounter(multiplier: 1, shift: 0)))]),
        BodyCase(name: "mov [0xd0000040], eax (moffs): discard", bytes: [0xa3, 0x40, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00],
                 routes: [L.route(.memory(L.wideTarget), width: 4, .write, .discardWrite)]),
        BodyCase(name: "mov word [rip+0x20], 0x41: discard", bytes: [0x66, 0xc7, 0x05, 0x20, 0x00, 0x00, 0x00, 0x41, 0x00],
                 routes: [L.route(.memory(StubLayout.site + 9 + 0x20), width: 2, .write, .discardWrite)]),
    ]
}()

/// Emits a stub for `c` at ``StubLayout/stub`` and decodes it.
func stub(_ c: BodyCase) throws -> (instruction: X86Instruction, bytes: [UInt8], body: FastPathBody, decoded: [X86Instruction]) {
    let i = try X86Disassembler().decode(c.bytes, address: StubLayout.site)
    let (bytes, body) = try FastPathEmitter.instructionStub(for: i, routes: c.routes, at: StubLayout.stub)
    return (i, bytes, body, try X86Disassembler().decodeAll(bytes, address: StubLayout.stub))
}

@Suite struct FastPathEmitterTests {
    @Test("every stub shape decodes whole, branches stay inside it or go back to the site, data is addressed where the routes say",
          arguments: bodyCases)
    func stubShape(c: BodyCase) throws {
        let (i, bytes, body, d) = try stub(c)
        #expect(d.map(\.length).reduce(0, +) == bytes.count, "the stub decodes whole")
        #expect(body.range == StubLayout.stub..<StubLayout.stub + UInt64(bytes.count - 5))
        // Entry: below the red zone, flags saved; exit: jmp to the instruction's end, never ret.
        #expect(d.first?.description == "lea rsp, [rsp - 0x80]")
        #expect(d.dropFirst().first?.mnemonic == "pushfq")
        #expect(d.last?.mnemonic == "jmp" && d.last?.branch?.target == i.nextAddress)
        #expect(!d.contains { $0.groups.contains(.return) })
        // A port kick: push rdx; mov edx, port; out dx, al; pop rdx, after a look at the wake flag.
        let kicks = d.indices.filter { d[$0].mnemonic == "out" && !body.fallback.contains(d[$0].address) }
        let kickPushes = Set(kicks.flatMap { [$0 - 2, $0 + 1] })
        for k in kicks {
            #expect(d[k - 2].description == "push rdx" && d[k - 1].description == "mov edx, 0x704" && d[k + 1].description == "pop rdx")
        }
        #expect(kicks.count == c.routes.filter { $0.ring?.kick != nil }.count)
        for r in c.routes { if let ring = r.ring, ring.kick != nil {
            #expect(d.contains { $0.description.hasPrefix("test dword ptr [rip") && $0.description.hasSuffix(", 4")
                && $0.nextAddress &+ UInt64(bitPattern: $0.memoryOperands[0].memory!.displacement) == ring.base + PVRingLayout.flagsOffset })
        } }
        // Two restores (fallback and served), each the pushes in reverse, popfq, lea rsp back.
        let pushes = d.indices.filter { d[$0].mnemonic == "push" && !kickPushes.contains($0) }.map { d[$0].operandText }
        let pops = d.indices.filter { d[$0].mnemonic == "pop" && !kickPushes.contains($0) }.map { d[$0].operandText }
        #expect(pops == pushes.reversed() + pushes.reversed())
        #expect(d.filter { $0.mnemonic == "popfq" }.count == 2)
        #expect(d.filter { $0.description == "lea rsp, [rsp + 0x80]" }.count == 2)
        #expect(body.stackBytes == 8 * (pushes.count + 1 + (kicks.isEmpty ? 0 : 1)) && body.stackBytes <= FastPathEmitter.stackLimit)
        // Branches land on instruction starts of the stub, or at the site's end.
        let starts = Set(d.map(\.address))
        for b in d.compactMap(\.branch) {
            #expect(starts.contains(b.target) || b.target == body.range.upperBound || b.target == i.nextAddress)
        }
        // The fallback is the original instruction, relocated.
        let f = d.filter { body.fallback.contains($0.address) }
        #expect(f.count == 1 && f.first?.mnemonic == i.mnemonic && f.first?.length == i.length)
        if let fi = f.first, fi.encoding.isRIPRelative, let m = fi.memoryOperands.first?.memory, let o = i.memoryOperands.first?.memory {
            #expect(fi.nextAddress &+ UInt64(bitPattern: m.displacement) == i.nextAddress &+ UInt64(bitPattern: o.displacement))
        }
        // Every other RIP-relative operand names a route's word or a ring field.
        var data: Set<UInt64> = []
        for r in c.routes {
            data.formUnion([r.enableWord, r.hitCounter])
            if case .sharedSlotRead = r.kind, let s = r.slot { data.insert(s) }
            for ring in (r.ring.map { [$0] } ?? []) + r.pendingRings {
                data.formUnion([ring.base, ring.base + PVRingLayout.flagsOffset, ring.base + PVRingLayout.consumerOffset,
                                ring.base + PVRingLayout.slotsOffset])
                if let w = ring.waitCounter { data.insert(w) }
            }
        }
        for x in d where x.encoding.isRIPRelative && !body.fallback.contains(x.address) {
            guard let m = x.memoryOperands.first?.memory ?? x.operands.compactMap(\.memory).first else { continue }
            #expect(data.contains(x.nextAddress &+ UInt64(bitPattern: m.displacement)), "\(x)")
        }
        // Each route checks its enable word and counts its hits.
        for r in c.routes {
            #expect(d.contains { $0.description.hasPrefix("cmp dword ptr [rip") && $0.nextAddress &+ UInt64(bitPattern: $0.memoryOperands[0].memory!.displacement) == r.enableWord })
            #expect(d.contains { $0.description.hasPrefix("inc qword ptr [rip") && $0.nextAddress &+ UInt64(bitPattern: $0.memoryOperands[0].memory!.displacement) == r.hitCounter })
        }
        // Only 8-byte lock cmpxchg, never cmpxchg16b.
        #expect(d.filter { $0.mnemonic.contains("cmpxchg") }.allSatisfy { $0.description.contains("qword") && $0.mnemonic == "lock cmpxchg" && $0.groups.contains(.locked) })
    }

    @Test("a synchronous append with a wait counter adds limit - n (the iterations it waited) once, after its wait, then kicks only if n ran out")
    func waitCounter() throws {
        let counted = try stub(try #require(bodyCases.first { $0.name.contains("wait counter") }))
        let plain = try stub(try #require(bodyCases.first { $0.name == "mov [rsi+0x40], eax: synchronous ring with a kick (doorbell)" }))
        let d = counted.decoded
        let adds = d.indices.filter { d[$0].description.hasPrefix("add qword ptr [rip") }
        #expect(adds.count == 1)
        let k = try #require(adds.first)
        let m = try #require(d[k].memoryOperands.first?.memory)
        #expect(d[k].nextAddress &+ UInt64(bitPattern: m.displacement) == StubLayout.hits + 8)
        #expect(d[k].description.hasSuffix(", rax"))
        #expect(d[k - 2].description == "mov eax, 0x10000" && d[k - 1].mnemonic == "sub" && d[k - 1].operandText.hasPrefix("eax, "))
        // n == 0: the wait ran out, fall through to the kick; otherwise served.
        #expect(d[k + 1].mnemonic == "test" && d[k + 2].mnemonic == "jne")
        #expect(d.filter { $0.mnemonic == "pause" }.count == plain.decoded.filter { $0.mnemonic == "pause" }.count)
        // Without a wait counter the body is the one it was.
        #expect(!plain.decoded.contains { $0.description.hasPrefix("add qword ptr [rip") })
    }

    @Test("with locked counters the hit counter is bumped by lock inc and the wait counter by lock add; the rest of the body is the same",
          arguments: bodyCases)
    func lockedCounters(c: BodyCase) throws {
        var locked = c
        locked.routes = c.routes.map { var r = $0; r.lockedCounters = true; return r }
        let plain = try stub(c), l = try stub(locked)
        #expect(l.decoded.map(\.length).reduce(0, +) == l.bytes.count, "the stub decodes whole")
        let incs = l.decoded.filter { $0.mnemonic.hasSuffix("inc") && !$0.memoryOperands.isEmpty }
        #expect(incs.count == c.routes.count && incs.allSatisfy { $0.bytes.first == 0xf0 && $0.groups.contains(.locked) },
                "\(incs.map(\.description))")
        for i in incs {
            let m = try #require(i.memoryOperands.first?.memory)
            let target = i.nextAddress &+ UInt64(bitPattern: m.displacement)
            #expect(c.routes.contains { $0.hitCounter == target })
        }
        let waitAdds = l.decoded.filter { $0.mnemonic.hasSuffix("add") && $0.bytes.first == 0xf0 }
        #expect(waitAdds.count == c.routes.filter { $0.ring?.waitCounter != nil && $0.ring?.synchronous == true }.count)
        // Nothing else changes: one lock prefix byte per counter update.
        #expect(l.bytes.count == plain.bytes.count + incs.count + waitAdds.count)
        #expect(l.decoded.count == plain.decoded.count)
    }

    @Test("scratch registers are never ones the instruction names, except rax (and rdx for a port kick), which are saved first",
          arguments: bodyCases)
    func scratchRegisters(c: BodyCase) throws {
        let (i, _, body, d) = try stub(c)
        let named = Set((i.registersRead + i.registersWritten).map(\.architectural))
        let pushed = d.filter { $0.mnemonic == "push" }.compactMap { x -> X86Register? in
            if case .register(let r) = x.operands.first?.operand { r } else { nil }
        }
        for r in pushed where named.contains(r) { #expect(r == .rax || r == .rdx, "\(r) is named by \(i)") }
        // A read's destination is never pushed (its new value must survive the restore), except rax/rdx
        // around rdtsc and mul: then the value is written into the destination's stack slot.
        let tsc = c.routes.contains { if case .tscCounter = $0.kind { true } else { false } }
        if !tsc, case .success(.load(_, let dst, _, _)) = i.accessShape { #expect(!pushed.contains(dst.architectural)) }
        if !tsc, case .success(.portIn(_, let dst, _)) = i.accessShape { #expect(!pushed.contains(dst.architectural)) }
        if tsc { #expect(d.contains { $0.mnemonic == "rdtsc" } && d.contains { $0.mnemonic == "mul" }) }
        _ = body
    }

    @Test("a shared-slot read loads its destination from the slot, once, after the enable word and the rings-empty check", arguments: [
        ("mov eax, [rcx+4]: shared slot while the doorbell's ring is empty (c-doorbell-cpl3 STATUS)", "mov eax, dword ptr [rip"),
        ("mov eax, [rsi+4]: shared slot (doorbell-cpl3 STATUS)", "mov eax, dword ptr [rip"),
        ("movsxd rdx, [rbx+4]: shared slot", "movsxd rdx, dword ptr [rip"),
    ])
    func sharedSlotLoad(name: String, load: String) throws {
        let c = try #require(bodyCases.first { $0.name == name })
        let (_, _, body, d) = try stub(c)
        func target(_ x: X86Instruction) -> UInt64? {
            guard x.encoding.isRIPRelative, let m = x.memoryOperands.first?.memory else { return nil }
            return x.nextAddress &+ UInt64(bitPattern: m.displacement)
        }
        let loads = d.indices.filter { target(d[$0]) == StubLayout.slot }
        #expect(loads.count == 1 && loads.allSatisfy { d[$0].description.hasPrefix(load) }, "\(d.map(\.description))")
        let k = try #require(loads.first)
        let enable = try #require(d.indices.first { target(d[$0]) == StubLayout.enable })
        #expect(enable < k && d[enable + 1].mnemonic == "je")
        // With pending rings: the consumer index and the hint are compared before the load.
        let consumer = d.indices.first { target(d[$0]) == StubLayout.ring + PVRingLayout.consumerOffset }
        #expect((consumer != nil) == !c.routes[0].pendingRings.isEmpty)
        if let consumer { #expect(enable < consumer && consumer < k) }
        // Then the hit counter, then done: the slot is the destination's only new value.
        #expect(d[k + 1].description.hasPrefix("inc qword ptr [rip") && target(d[k + 1]) == StubLayout.hits)
        #expect(!body.fallback.contains(d[k].address))
    }

    @Test("the patch at the site is jmp rel32 to the stub, padded with NOPs to the instruction's end")
    func siteJump() throws {
        let i = try X86Disassembler().decode([0xc7, 0x44, 0x8f, 0x08, 0x07, 0x00, 0x00, 0x00], address: StubLayout.site)
        let patch = try FastPathEmitter.siteJump(replacing: i, to: StubLayout.stub)
        let d = try X86Disassembler().decodeAll(patch, address: StubLayout.site)
        #expect(patch.count == i.length && d.map(\.mnemonic) == ["jmp", "nop"])
        #expect(d[0].branch?.target == StubLayout.stub)
        let short = try X86Disassembler().decode([0xee], address: StubLayout.site)
        #expect(throws: DMPRefusal.self) { try FastPathEmitter.siteJump(replacing: short, to: StubLayout.stub) }
    }

    @Test("instructions that are not plain loads, stores or port I/O are refused with a reason", arguments: [
        ([0x01, 0x06], "read-modify-write"),                      // add [rsi], eax
        ([0xf0, 0xff, 0x06], "locked"),                           // lock inc dword [rsi]
        ([0x87, 0x06], "read-modify-write"),                      // xchg [rsi], eax
        ([0xf3, 0x6e], "string"),                                 // rep outsb
        ([0x6c], "string"),                                       // insb
        ([0x83, 0x3e, 0x00], "flags"),                            // cmp dword [rsi], 0
        ([0x64, 0x8b, 0x06], "fs/gs"),                            // mov eax, fs:[rsi]
        ([0x67, 0x8b, 0x06], "67"),                               // mov eax, [esi]
        ([0xff, 0x36], "not a plain"),                            // push qword [rsi]
        ([0x0f, 0x10, 0x06], "not a plain"),                      // movups xmm0, [rsi]
        ([0x90], "not a plain"),                                  // nop
    ] as [([UInt8], String)])
    func refusedInstructions(bytes: [UInt8], reason: String) throws {
        let i = try X86Disassembler().decode(bytes, address: StubLayout.site)
        let r = StubLayout.route(.memory(0x1000), width: 4, .read, .constantRead(0))
        var a = X86Assembler(origin: StubLayout.stub)
        do {
            try FastPathEmitter.emitBody(for: i, routes: [r], into: &a)
            Issue.record("\(i) was given a body")
        } catch {
            #expect(error.stage == .fastPath && error.reason.contains(reason), "\(error)")
        }
        #expect(a.bytes.isEmpty)
    }

    @Test("routes that cannot apply to the instruction are refused, not emitted", arguments: [
        ([0xec], StubLayout.route(.port(0x3fd), width: 2, .read, .constantRead(0)), "bytes wide"),
        ([0xec], StubLayout.route(.port(0x3fd), width: 1, .write, .discardWrite), "route for a read"),
        ([0xec], StubLayout.route(.port(0x3fd), width: 1, .read, .discardWrite), "write fast path"),
        ([0xec], StubLayout.route(.memory(0x3fd), width: 1, .read, .constantRead(0)), "never matches"),
        ([0xe4, 0x60], StubLayout.route(.port(0x64), width: 1, .read, .constantRead(0)), "never matches"),
        ([0x8a, 0x26], StubLayout.route(.memory(0x1000), width: 1, .read, .tscCounter(TSCCounter(multiplier: 1, shift: 0))), "high-byte"),
        ([0x48, 0x89, 0x06], StubLayout.route(.memory(0x1000), width: 8, .write, .ringAppend(ring: 0, mode: .asynchronous), ring: StubLayout.asyncRing), "32 bits"),
        ([0xee], StubLayout.route(.port(0x3f8), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous)), "without a ring"),
        ([0xee], StubLayout.route(.port(0x3f8), width: 1, .write, .ringAppend(ring: 0, mode: .asynchronous),
                                  ring: RingMapping(base: StubLayout.ring, slotCount: 6, synchronous: false)), "power of two"),
        ([0x8b, 0x06], StubLayout.route(.memory(0x1000), width: 4, .read, .sharedSlotRead(slot: 0)), "never"),
    ] as [([UInt8], FastPathRoute, String)])
    func refusedRoutes(bytes: [UInt8], route: FastPathRoute, reason: String) throws {
        let i = try X86Disassembler().decode(bytes, address: StubLayout.site)
        var r = route
        if reason == "never" { r.slot = nil; r.target = .memory(0x1000) }
        var a = X86Assembler(origin: StubLayout.stub)
        do {
            try FastPathEmitter.emitBody(for: i, routes: [r], into: &a)
            Issue.record("\(i) with \(r.kind) was given a body")
        } catch {
            #expect(error.stage == .fastPath, "\(error)")
            if reason != "never" { #expect(error.reason.contains(reason), "\(error)") }
        }
        #expect(a.bytes.isEmpty)
    }

    @Test("no routes, duplicate routes, and data beyond ±2 GiB are refused")
    func refusedSets() throws {
        let i = try X86Disassembler().decode([0xec], address: StubLayout.site)
        let r = StubLayout.route(.port(0x3fd), width: 1, .read, .constantRead(0x60))
        var a = X86Assembler(origin: StubLayout.stub)
        #expect(throws: DMPRefusal.self) { try FastPathEmitter.emitBody(for: i, routes: [], into: &a) }
        #expect(throws: DMPRefusal.self) { try FastPathEmitter.emitBody(for: i, routes: [r, r], into: &a) }
        var far = r
        far.enableWord = StubLayout.stub + (3 << 30)
        do { try FastPathEmitter.emitBody(for: i, routes: [far], into: &a) } catch { #expect(error.stage == .encode) }
        #expect(a.bytes.isEmpty)
    }

    @Test("constant reads give the destination the access width's semantics", arguments: [
        ([0x8a, 0x06], UInt64(0x1ff), "mov al, 0xff"),              // mov al, [rsi]: 8-bit write, upper bits kept
        ([0x8a, 0x26], UInt64(0x80), "mov ah, 0x80"),               // mov ah, [rsi]
        ([0x66, 0x8b, 0x06], UInt64(0x12345), "mov ax, 0x2345"),    // mov ax, [rsi]
        ([0x8b, 0x06], UInt64(0xffff_ffff_8000_0000), "mov eax, 0x80000000"),
        ([0x0f, 0xbe, 0x06], UInt64(0x80), "mov eax, 0xffffff80"),  // movsx eax, byte [rsi]
        ([0x48, 0x0f, 0xbf, 0x06], UInt64(0x8000), "mov rax, -0x8000"), // movsx rax, word [rsi]
        ([0x66, 0x0f, 0xb6, 0x06], UInt64(0xff), "mov ax, 0xff"),   // movzx ax, byte [rsi]
        ([0x48, 0x63, 0x06], UInt64(0x7fff_ffff), "mov eax, 0x7fffffff"), // movsxd rax, [rsi]: positive, zero upper
    ] as [([UInt8], UInt64, String)])
    func constantWidths(bytes: [UInt8], value: UInt64, expected: String) throws {
        let i = try X86Disassembler().decode(bytes, address: StubLayout.site)
        guard case .success(.load(let w, _, _, _)) = i.accessShape else { Issue.record("\(i)"); return }
        let r = StubLayout.route(.memory(0x1000), width: w, .read, .constantRead(value))
        let (b, _) = try FastPathEmitter.instructionStub(for: i, routes: [r], at: StubLayout.stub)
        let d = try X86Disassembler().decodeAll(b, address: StubLayout.stub)
        #expect(d.contains { $0.description == expected }, "\(d.map(\.description))")
    }
}


@Suite struct FlagLivenessTests {
    @Test("without pushfq/popfq a body is the same but for those three bytes (and the lea rsp pair when nothing else is pushed), and uses 8 bytes less stack",
          arguments: bodyCases)
    func withoutFlags(c: BodyCase) throws {
        let i = try X86Disassembler().decode(c.bytes, address: StubLayout.site)
        let (with, bodyWith) = try FastPathEmitter.instructionStub(for: i, routes: c.routes, at: StubLayout.stub)
        let (without, bodyWithout) = try FastPathEmitter.instructionStub(for: i, routes: c.routes, preserveFlags: false, at: StubLayout.stub)
        let d = try X86Disassembler().decodeAll(without, address: StubLayout.stub)
        #expect(d.map(\.length).reduce(0, +) == without.count)
        #expect(!d.contains { $0.mnemonic == "pushfq" || $0.mnemonic == "popfq" })
        #expect(bodyWithout.stackBytes == bodyWith.stackBytes - 8)
        // lea rsp, [rsp - 0x80] is 5 bytes, lea rsp, [rsp + 0x80] 8 (once per restore).
        let leaPair = bodyWithout.stackBytes == 0 ? 5 + 2 * 8 : 0
        #expect(without.count == with.count - 3 - leaPair)
        #expect(d.contains { $0.description.hasPrefix("lea rsp") } == (bodyWithout.stackBytes > 0))
        #expect(d.last?.branch?.target == i.nextAddress)
    }

    @Test("with lahf the flags are saved by lahf/seto al in a pushed word and restored by add al, 0x7f/sahf; pushfq stays for a read into rax",
          arguments: bodyCases)
    func lahfShape(c: BodyCase) throws {
        let i = try X86Disassembler().decode(c.bytes, address: StubLayout.site)
        let (bytes, body) = try FastPathEmitter.instructionStub(for: i, routes: c.routes, lahf: true, at: StubLayout.stub)
        let (plain, plainBody) = try FastPathEmitter.instructionStub(for: i, routes: c.routes, at: StubLayout.stub)
        let d = try X86Disassembler().decodeAll(bytes, address: StubLayout.stub)
        #expect(d.map(\.length).reduce(0, +) == bytes.count, "the stub decodes whole")
        #expect(body.stackBytes <= FastPathEmitter.stackLimit)
        var readsRAX = false
        switch i.accessShape {
        case .success(.load(_, let dst, _, _)), .success(.portIn(_, let dst, _)): readsRAX = dst.architectural == .rax
        default: break
        }
        if readsRAX {
            #expect(bytes == plain && body == plainBody, "a read into rax keeps pushfq/popfq")
            return
        }
        let text = d.map(\.description)
        #expect(!d.contains { $0.mnemonic == "pushfq" || $0.mnemonic == "popfq" })
        let k = try #require(text.firstIndex(of: "lahf"))
        #expect(Array(text[k...].prefix(3)) == ["lahf", "seto al", "push rax"])
        #expect(text.filter { $0 == "lahf" }.count == 1)
        #expect(text.prefix(k).contains("push rax"), "rax is saved before lahf takes ah")
        // Both restores: pop rax; add al, 0x7f; sahf; then the saved registers.
        let restores = text.indices.filter { text[$0] == "sahf" }
        #expect(restores.count == 2)
        for r in restores { #expect(Array(text[(r - 2)...r]) == ["pop rax", "add al, 0x7f", "sahf"]) }
        // Nothing between lahf and the flags word changes a flag; nothing after sahf does either.
        for x in d[k..<(k + 3)] { #expect(x.flagsWritten.isEmpty, "\(x)") }
        for r in restores { for x in d[(r + 1)...] where x.mnemonic == "pop" || x.mnemonic == "lea" { #expect(x.flagsWritten.isEmpty) } }
    }

    @Test("the arithmetic flags are dead before an instruction that writes all six and reads none", arguments: [
        ([0x83, 0xf8, 0x01], true),         // cmp eax, 1
        ([0x01, 0xd8], true),               // add eax, ebx
        ([0x85, 0xc0], true),               // test eax, eax
        ([0xff, 0xc0], false),              // inc eax: CF kept
        ([0x11, 0xd8], false),              // adc eax, ebx: reads CF
        ([0x75, 0x02], false),              // jne: reads ZF
        ([0x89, 0xd8], false),              // mov eax, ebx: writes none
        ([0xd3, 0xe0], false),              // shl eax, cl: a zero count keeps them
        ([0x9c], false),                    // pushfq: reads them all
    ] as [([UInt8], Bool)])
    func dead(bytes: [UInt8], dead: Bool) throws {
        let next = try X86Disassembler().decode(bytes, address: StubLayout.site + 1)
        #expect(FastPathEmitter.arithmeticFlagsDead(before: next) == dead, "\(next)")
    }

    @Test("bodyBytes is the body alone, as emitBody writes it at the same origin")
    func bodyBytes() throws {
        let c = bodyCases[4]
        let i = try X86Disassembler().decode(c.bytes, address: StubLayout.site)
        var a = X86Assembler(origin: StubLayout.stub)
        try FastPathEmitter.emitBody(for: i, routes: c.routes, into: &a)
        #expect(try FastPathEmitter.bodyBytes(for: i, routes: c.routes, at: StubLayout.stub) == a.finish())
    }
}
