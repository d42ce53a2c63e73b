import DMP
import Testing
import VMMKit

/// DMP on the C UART guest built at -Os and -O1 (Guests/README.md): the port accessors
/// `io_serial_in_slow`/`io_serial_out_slow` are tiny out-of-line functions reached only through
/// the port's function pointers, whose first instruction is 2 bytes, with no dead padding in reach.
/// DMP serves them from a copy of their caller, `serial8250_console_putchar`, in which the
/// indirect calls are promoted (``DMPConfiguration/Strategies/callPromotion``).
extension KVMTests {
    /// The accessor sites of a run's report.
    private func accessorSites(_ run: DMPLibraryRun, _ names: [String] = ["io_serial_in_slow", "io_serial_out_slow"]) -> [PatchSite] {
        run.report.filter { s in names.contains { s.location.hasPrefix($0 + "+") } }
    }

    @Test("c-uart-cpl3 at -Os and -O1: the four accessor sites served from a copy of their caller with its indirect calls promoted; same output, over 90% of the steady exits gone",
          arguments: ["c-uart-cpl3-Os", "c-uart-cpl3-O1"])
    func dmpCUartPromotedCalls(image: String) throws {
        let off = try DMPLibraryRun(image, commandLine: "iters=120", dmp: false)
        let on = try DMPLibraryRun(image, commandLine: "iters=120")
        #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
        let sites = accessorSites(on)
        #expect(Set(sites.map(\.site.address)) == [0x3f8, 0x3fd, 0x80], "\(DMPReport.text(on.report))")
        #expect(sites.count == 4, "\(DMPReport.text(on.report))")
        for s in sites {
            #expect(s.state == .patched && s.hitsServed > 0 && s.refusal == nil, "\(s)")
            #expect(s.strategy.hasPrefix("function copy of serial8250_console_putchar") && s.strategy.contains("promoted call"), "\(s.strategy)")
            #expect(s.userMode)
        }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    @Test("c-uart-cpl3 at -Os and -O1 without call promotion: the accessors' in al, dx and out dx, al have no way into a copy and are refused as such; same output")
    func dmpCUartWithoutPromotion() throws {
        for image in ["c-uart-cpl3-Os", "c-uart-cpl3-O1"] {
            let off = try DMPLibraryRun(image, commandLine: "iters=120", dmp: false)
            let on = try DMPLibraryRun(image, commandLine: "iters=120") { $0.strategies = [.instructionStub, .functionCopy] }
            let dx = on.report.filter { $0.instruction == "in al, dx" || $0.instruction == "out dx, al" }
            #expect(dx.count == 2, "\(image): \(DMPReport.text(on.report))")
            for s in dx {
                #expect(s.state == .refused && s.refusal?.reason.contains("no entry into the copy") == true, "\(image): \(s)")
            }
            #expect(on.lines == off.lines && on.stop == off.stop)
        }
    }

    @Test("c-uart-cpl3-Os with only start and call-site entries: the caller's copy cannot be entered either; every accessor site refused with both reasons, same output")
    func dmpCUartPromotionRefused() throws {
        let off = try DMPLibraryRun("c-uart-cpl3-Os", commandLine: "iters=120", dmp: false)
        let on = try DMPLibraryRun("c-uart-cpl3-Os", commandLine: "iters=120") {
            $0.copyEntryKinds = [.functionEntry, .entryThroughPadding, .callSite, .tailCallSite]
        }
        let sites = accessorSites(on)
        #expect(sites.count == 4, "\(DMPReport.text(on.report))")
        for s in sites {
            let reason = s.refusal?.reason ?? ""
            #expect(s.state == .refused, "\(s)")
            #expect(reason.contains("no entry into the copy of io_serial_"), "\(reason)")
            #expect(reason.contains("call promotion: no entry into the copy of serial8250_console_putchar reaches its promoted call"), "\(reason)")
        }
        #expect(on.lines == off.lines && on.stop == off.stop)
    }

    @Test("c-uart-cpl3-Os and -O1 whose port switches to the plain accessors mid-run: promoted calls take the miss path (the original call), then compare two accessors each; same output")
    func dmpCUartPromotedCallMissPath() throws {
        for image in ["c-uart-cpl3-Os", "c-uart-cpl3-O1"] {
            // At the steady phase's start marker, both runs point com1's serial_in/serial_out at io_serial_in/io_serial_out.
            let symbols = try ELFImage(bytes: try guestImage(image)).symbols.symbols
            let swap: (VirtualMachine) throws -> Void = { vm in
                let com1 = try #require(symbols.first { $0.name == "com1" }?.address)
                let plainIn = try #require(symbols.first { $0.name == "io_serial_in" }?.address)
                let plainOut = try #require(symbols.first { $0.name == "io_serial_out" }?.address)
                let memory = vm.memory
                vm.addExitHandler(ClosureExitHandler { exit, _ in
                    if case .io(let io) = exit, io.port == StandardDevices.markerPort, io.direction == .write,
                       (try? memory.read(UInt64.self, at: GuestAddress(com1 + 0x10))) != plainIn {
                        try? memory.write(plainIn, at: GuestAddress(com1 + 0x10))
                        try? memory.write(plainOut, at: GuestAddress(com1 + 0x18))
                    }
                    return .pass
                })
            }
            let off = try DMPLibraryRun(image, commandLine: "iters=200", dmp: false, prepare: swap)
            let on = try DMPLibraryRun(image, commandLine: "iters=200", prepare: swap)
            #expect(on.stop == .guestExit(status: 0) && off.stop == on.stop)
            // The plain accessors' sites are served too: their promoted calls compare two accessors.
            let plain = accessorSites(on, ["io_serial_in", "io_serial_out"])
            #expect(Set(plain.map(\.site.address)) == [0x3f8, 0x3fd], "\(image): \(DMPReport.text(on.report))")
            for s in plain {
                #expect(s.state == .patched && s.hitsServed > 0, "\(image): \(s)")
                #expect(s.strategy.contains("io_serial_in_slow/io_serial_in") && s.strategy.contains("io_serial_out_slow/io_serial_out"), "\(s.strategy)")
            }
            try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
        }
    }
}
