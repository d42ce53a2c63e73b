@testable import DMP
import Testing
import VMMKit
import X86Disassembler

/// Refusals that tell a VMM author what to change: a declined write with no ring, a copy with no symbols.
@Suite struct RefusalHintTests {
    @Test func declinedWriteWithoutRingNamesExtraRingTargets() {
        let hint = PatchPlanner.noRingHint(.declined(device: "tick-block"), direction: .write, ring: nil, rings: true)
        #expect(hint.contains("no paravirtual ring targets this register") && hint.contains("extraRingTargets"))
        let noRings = PatchPlanner.noRingHint(.declined(device: "tick-block"), direction: .write, ring: nil, rings: false)
        #expect(noRings.contains("installed without rings"))
    }

    @Test func noHintWhereARingCannotHelp() {
        // A read, a write that had its ring, or another refusal: the device's or the bus's reason stands alone.
        #expect(PatchPlanner.noRingHint(.declined(device: "d"), direction: .read, ring: nil, rings: true).isEmpty)
        #expect(PatchPlanner.noRingHint(.declined(device: "d"), direction: .write, ring: 2, rings: true).isEmpty)
        #expect(PatchPlanner.noRingHint(.unclaimed, direction: .write, ring: nil, rings: true).isEmpty)
        #expect(PatchPlanner.noRingHint(.kernelHandled(.ioeventfd), direction: .write, ring: nil, rings: true).isEmpty)
    }

    @Test func copyWithoutSymbolsNamesUse() throws {
        let d = try X86Disassembler()
        let image = CodeImage(regions: [.init(address: 0x40_0000, bytes: [0x89, 0xfa, 0xec, 0xc3])], symbols: SymbolTable([]))
        let refusal = try #require(throws: DMPRefusal.self) {
            try FunctionCopyPlan.make(hot: [HotRewrite(address: 0x40_0002, bytes: [0x90])], in: image,
                                      at: copyPlacement, disassembler: d)
        }
        #expect(refusal.reason.contains("no sized function symbol covers 0x400002"))
        #expect(refusal.reason.contains("stripped") && refusal.reason.contains("DMPConfiguration.use(_:)"))
    }
}
