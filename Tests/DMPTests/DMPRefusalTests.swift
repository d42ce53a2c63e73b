import DMP
import Testing

@Suite struct DMPRefusalTests {
    @Test func describesStageAndReason() {
        let r = DMPRefusal(.plan, "instruction shorter than 5 bytes outside a sized function")
        #expect(r.description == "plan: instruction shorter than 5 bytes outside a sized function")
        #expect(DMPRefusal(.fastPath, "x").description.hasPrefix("fast path: "))
    }
}
