import Testing
import VMMKit
import VMMKitTesting

@Suite("CapturedOutput: bounded by its limit, whatever the guest writes")
struct CapturedOutputTests {
    @Test("a guest that writes past the limit: the first bytes are kept, the rest counted, never stored")
    func limitHoldsAgainstTheGuest() throws {
        let mock = MockHypervisor()
        let vm = try makeVM(mock)
        let captured = CapturedOutput(limit: 8)
        try vm.bus.attach(UART8250(sink: captured.sink()), ports: 0x3f8..<0x400)
        let line = Array("HELLO WORLD\n".utf8).map(UInt64.init)
        // Three string writes of the line (the UART's sink flushes at each newline).
        let write = MockStep.exit(.io(PortIO(port: 0x3f8, size: 1, count: UInt32(line.count), direction: .write)), data: line)
        mock.vcpu(0)?.script([write, write, write])
        _ = try vm.run()
        #expect(captured.text == "HELLO WO")
        #expect(captured.data.count == captured.limit)
        #expect(captured.droppedByteCount == 3 * line.count - 8)
    }

    @Test("the default limit is 64 MiB; a limit below 0 keeps nothing; output under the limit is kept whole")
    func limits() {
        #expect(CapturedOutput().limit == 64 << 20)
        #expect(CapturedOutput.defaultLimit == 64 << 20)
        let none = CapturedOutput(limit: -1), sink = none.sink()
        for b in Array("abc\n".utf8) { sink.put(b) }
        #expect(none.limit == 0 && none.data.isEmpty && none.droppedByteCount == 4)
        let all = CapturedOutput(), s = all.sink()
        for b in Array("abc\n".utf8) { s.put(b) }
        #expect(all.text == "abc\n" && all.droppedByteCount == 0)
    }
}
