import DMP
import Testing
import VMMKit
import X86Disassembler

/// The sites a plan serves beside its hot one (``PatchPlanner`` siblings): which instructions can have made an
/// exit, and which linear address an MMIO sibling's body serves.
@Suite("PatchPlanner siblings")
struct SiblingTests {
    static func decode(_ bytes: [UInt8], at address: UInt64 = 0x1000) throws -> X86Instruction {
        try #require(try X86Disassembler(mode: .bits64).decodeAll(bytes, address: address, mode: .bits64).first)
    }

    static func mmio(_ rip: UInt64, _ address: UInt64, size: UInt8 = 4, _ direction: AccessDirection) -> ExitSite {
        ExitSite(rip: rip, kind: .mmio, address: address, size: size, direction: direction)
    }

    @Test("an MMIO site is plausible only for a plain load or store of its width in its direction")
    func plausibleMMIO() throws {
        let store = try SiblingTests.decode([0x89, 0x08]) // mov [rax], ecx
        let load = try SiblingTests.decode([0x8b, 0x4f, 0x04]) // mov ecx, [rdi + 4]
        let add = try SiblingTests.decode([0x01, 0x08]) // add [rax], ecx
        let out = try SiblingTests.decode([0xee]) // out dx, al
        #expect(PatchPlanner.plausible(store, for: SiblingTests.mmio(0x1002, 0xd000_0040, .write)))
        #expect(!PatchPlanner.plausible(store, for: SiblingTests.mmio(0x1002, 0xd000_0040, .read)))
        #expect(!PatchPlanner.plausible(store, for: SiblingTests.mmio(0x1002, 0xd000_0040, size: 2, .write)))
        #expect(PatchPlanner.plausible(load, for: SiblingTests.mmio(0x1000, 0xd000_0004, .read)))
        #expect(!PatchPlanner.plausible(load, for: SiblingTests.mmio(0x1000, 0xd000_0004, .write)))
        #expect(!PatchPlanner.plausible(add, for: SiblingTests.mmio(0x1002, 0xd000_0040, .write)), "read-modify-write")
        #expect(!PatchPlanner.plausible(out, for: SiblingTests.mmio(0x1001, 0x3f8, size: 1, .write)))
    }

    @Test("stores back to back: a sibling's exit RIP ends one and starts the next; the hot site's RIP position picks one")
    func backToBackSiblings() throws {
        let first = try SiblingTests.decode([0x89, 0x06], at: 0x1000) // mov [rsi], eax
        let second = try SiblingTests.decode([0x44, 0x89, 0x16], at: 0x1002) // mov [rsi], r10d
        let sibling = SiblingTests.mmio(0x1002, 0xd000_0040, .write)
        let both = [first, second]
        #expect(both.allSatisfy { PatchPlanner.plausible($0, for: sibling) })
        let hotWrite = SiblingTests.mmio(0x2005, 0xd000_0040, .write)
        // KVM completes an MMIO write before it exits: RIP past the store, so the sibling's store ends at its RIP.
        #expect(PatchPlanner.siblingInstruction(both, for: sibling, primary: hotWrite, position: .pastInstruction)?.address == 0x1000)
        #expect(PatchPlanner.siblingInstruction(both, for: sibling, primary: hotWrite, position: .onInstruction(length: 3))?.address == 0x1002)
        #expect(PatchPlanner.siblingInstruction(both, for: sibling, primary: hotWrite, position: .unknown) == nil)
        // The hot site's exit says nothing about another kind or direction of exit.
        let hotRead = SiblingTests.mmio(0x2000, 0xd000_0004, .read)
        #expect(PatchPlanner.siblingInstruction(both, for: sibling, primary: hotRead, position: .onInstruction(length: 3)) == nil)
        let hotPort = ExitSite(rip: 0x2001, kind: .io, address: 0x3f8, size: 1, direction: .write)
        #expect(PatchPlanner.siblingInstruction(both, for: sibling, primary: hotPort, position: .pastInstruction) == nil)
        // One candidate is the one; none is none.
        #expect(PatchPlanner.siblingInstruction([second], for: sibling, primary: hotRead, position: .unknown)?.address == 0x1002)
        #expect(PatchPlanner.siblingInstruction([], for: sibling, primary: hotWrite, position: .pastInstruction) == nil)
    }

    @Test("an MMIO sibling in the hot site's guest-physical page gets the hot site's linear page; elsewhere none")
    func mmioTarget() {
        let primary = SiblingTests.mmio(0x1002, 0xd000_0040, .write)
        // The hot store's operand was at linear 0x7fff_0040 (a mapping of the doorbell page elsewhere).
        #expect(PatchPlanner.siblingMemoryTarget(SiblingTests.mmio(0x1010, 0xd000_0040, .write), primary: primary,
                                                 primaryTarget: 0x7fff_0040) == 0x7fff_0040)
        #expect(PatchPlanner.siblingMemoryTarget(SiblingTests.mmio(0x1010, 0xd000_0004, .read), primary: primary,
                                                 primaryTarget: 0x7fff_0040) == 0x7fff_0004)
        #expect(PatchPlanner.siblingMemoryTarget(SiblingTests.mmio(0x1010, 0xd000_1040, .write), primary: primary,
                                                 primaryTarget: 0x7fff_0040) == nil, "another page")
        #expect(PatchPlanner.siblingMemoryTarget(SiblingTests.mmio(0x1010, 0xd000_0040, .write), primary: primary,
                                                 primaryTarget: nil) == nil, "no evaluated operand")
        #expect(PatchPlanner.siblingMemoryTarget(SiblingTests.mmio(0x1010, 0xd000_0040, .write), primary: primary,
                                                 primaryTarget: 0x7fff_0044) == nil, "an operand that is not the exit's address")
        let port = ExitSite(rip: 0x1001, kind: .io, address: 0x3f8, size: 1, direction: .write)
        #expect(PatchPlanner.siblingMemoryTarget(SiblingTests.mmio(0x1010, 0xd000_0040, .write), primary: port, primaryTarget: nil) == nil)
    }
}
