import Testing
import VMMKit
@testable import minivmm
#if canImport(Glibc)
import Synchronization
#endif

/// The guests written in C (`Guests/c-*.c`, gcc -O2, see Guests/README.md):
/// each boots through PVH under the library's standard devices, prints what
/// its source says it prints, reports its reference checksum and exits 0; the
/// VMM counts one exit per device access in the steady phase.
extension KVMTests {
    @Test("each C guest gives the reference checksum of Guests/README.md and exits 0", arguments: [
        ("c-uart-cpl3", 20, "0x4c6f97e4"), ("c-doorbell-cpl3", 16, "0x187b11fc"),
        ("c-doorbell-cpl3", 20, "0x01babf12"), ("c-doorbell-cpl3", 160, "0xce81ef52"),
        ("c-selfmod-cpl3", 20, "0x6fbbbc68"), ("c-selfmod-cpl3", 40, "0x15d62744"),
        ("c-poll-cpl3", 20, "0xeb4b3bf7"), ("c-poll-cpl3", 200, "0x0c6d19aa"),
        ("c-table-cpl3", 20, "0xcab924e6"), ("c-table-cpl3", 200, "0x22320181"),
        ("c-mmio-cpl3", 16, "0x187b11fc"), ("c-mmio-cpl3", 160, "0xce81ef52"),
        ("c-boot-cpl3", 20, "0x179ac4c3"), ("c-boot-cpl3", 200, "0xaf475a3c"),
        ("c-packed-cpl3", 20, "0xfad247c5"), ("c-packed-cpl3", 200, "0xb5ddc848"),
        ("c-higher-cpl3", 20, "0xfad247c5"), ("c-higher-cpl3", 200, "0xb5ddc848"),
    ])
    func cGuestChecksums(name: String, iters: Int, checksum: String) throws {
        let g = try GuestRun(name, commandLine: "iters=\(iters)")
        #expect(try g.run() == .guestExit(status: 0))
        let text = g.console.text
        #expect(resultField(text, "workload") == name)
        #expect(resultField(text, "iters") == String(iters))
        #expect(resultField(text, "warmup") == String(iters / 10))
        #expect(resultField(text, "checksum") == checksum, "\(text.suffix(200))")
        #expect((resultField(text, "cycles_per_iter").flatMap(UInt64.init) ?? 0) > 0)
    }

    @Test("c-uart-cpl3 prints exactly its formatted lines; 4 exits per byte in the steady phase (LSR, THR, two port-0x80 delays)")
    func cUartLines() throws {
        let ports = PortSet()
        let g = try GuestRun("c-uart-cpl3", commandLine: "iters=20 warmup=5") { vm in vm.addExitHandler(ports.handler) }
        #expect(try g.run() == .guestExit(status: 0))
        let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
                     "india", "juliett", "kilo", "lima", "mike"]
        var sum: UInt32 = 0
        var lines: [String] = []
        for i in 0..<20 {
            sum = sum &* 31 &+ UInt32(i)
            let word = words[i % words.count]
            lines.append("line " + leftPad(String(i), 5) + ": " + word + String(repeating: " ", count: max(0, 8 - word.count))
                         + " sum=" + hex8(sum) + " mod7=" + String(i % 7 - 3) + "\n")
        }
        let text = g.console.text
        #expect(text.hasPrefix(lines.joined()), "\(text.prefix(200))")
        #expect(resultField(text, "checksum") == "0x" + hex8(fnv1a(lines.joined())))
        let steadyBytes = lines[5...].joined().utf8.count
        #expect(g.devices.marker.steadyPhase?.exits == 4 * steadyBytes + 1, "one mark closes the phase")
        #expect(ports.value == [0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x80, 0xf4])
    }

    @Test("c-selfmod-cpl3's keys follow its rewritten constant in every epoch; 2 exits per byte in the steady phase")
    func cSelfmodLines() throws {
        let ports = PortSet()
        let n = 40
        let g = try GuestRun("c-selfmod-cpl3", commandLine: "iters=\(n)") { vm in vm.addExitHandler(ports.handler) }
        #expect(try g.run() == .guestExit(status: 0))
        var lines: [String] = []
        for i in 0..<n {
            let epoch = UInt32(i * 4 / n)
            let key = (UInt32(i) &* 2_654_435_761) ^ (0x5bd1_e995 &+ epoch &* 0x0100_0193)
            lines.append("line " + leftPad(String(i), 5) + ": epoch \(epoch) key=" + hex8(key) + "\n")
        }
        let text = g.console.text
        #expect(text.hasPrefix(lines.joined()), "\(text.prefix(300))")
        #expect(resultField(text, "checksum") == "0x" + hex8(fnv1a(lines.joined())))
        let steadyBytes = lines[(n / 10)...].joined().utf8.count
        #expect(g.devices.marker.steadyPhase?.exits == 2 * steadyBytes + 1, "rewriting its code costs no exit")
        #expect(ports.value == [0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0xf4])
    }

    @Test("c-doorbell-cpl3: one exit per request and per batch's STATUS read in the steady phase, every completion written")
    func cDoorbellExits() throws {
        let g = try GuestRun("c-doorbell-cpl3", commandLine: "iters=100 warmup=10")
        #expect(try g.run() == .guestExit(status: 0))
        #expect(g.devices.doorbell.completions == 100)
        #expect(g.devices.doorbell.error == 0)
        // 90 requests in batches of 16: 6 batches (the last of 10), each one STATUS read; then the closing mark.
        #expect(g.devices.marker.steadyPhase?.exits == 90 + 6 + 1)
    }

    @Test("c-doorbell-cpl3 without a doorbell device says so and exits 2")
    func cDoorbellNoDevice() throws {
        let g = try GuestRun("c-doorbell-cpl3", commandLine: "iters=16") { vm in
            // Claim the doorbell's reads first and answer with nothing like its ID.
            vm.addExitHandler(ClosureExitHandler { exit, ctx in
                guard case .mmio(let m) = exit, m.address == GuestAddress(StandardDevices.doorbellBase),
                      m.direction == .read else { return .pass }
                ctx.completeRead(0xffff_ffff)
                return .handled
            })
        }
        #expect(try g.run() == .guestExit(status: 2))
        #expect(g.console.text == "doorbell: no device answered\n")
    }
}

extension KVMTests {
    @Test("bench: the C guests run as full, coalesced and dmp workloads with agreeing checksums; static-pv is left out (no twin)")
    func cGuestBench() throws {
        let names = ["c-uart-cpl3", "c-doorbell-cpl3", "c-selfmod-cpl3"]
        let plan = WorkloadBenchPlan(workloads: BenchWorkload.all.filter { names.contains($0.name) },
                                     variants: BenchVariant.all, runs: 1, seconds: 1, fixedIterations: 2)
        let records = try runWorkloadBenchmark(plan, BenchEnvironment(guests: guestsDirectory, qemu: nil, tscPerNanosecond: 1))
        #expect(records.map { "\($0.workload) \($0.variant)" } == names.flatMap { ["\($0) full", "\($0) coalesced", "\($0) dmp"] })
        for r in records {
            #expect(r.cpl == 3 && r.totalIterations == 2 && r.iterations == 2, "iters=2 has no warm-up")
            #expect(r.steadyExits.map { $0 > 0 } == true)
            #expect(r.cyclesPerIteration > 0)
        }
        for name in names {
            #expect(Set(records.filter { $0.workload == name }.map(\.checksum)).count == 1, "\(name): full and coalesced agree")
        }
        for w in BenchWorkload.all where names.contains(w.name) {
            #expect(BenchVariant.staticPV.unavailable(w, BenchEnvironment(guests: "", qemu: nil, tscPerNanosecond: 1))
                    == "\(w.name) has no static-PV twin")
        }
    }
}

/// The ports of the I/O exits an exit handler saw (the phase marker's are consumed before it).
final class PortSet: Sendable {
    private let ports = Mutex<Set<UInt16>>([])
    var value: Set<UInt16> { ports.withLock { $0 } }
    var handler: ClosureExitHandler {
        ClosureExitHandler { [self] exit, _ in
            if case .io(let io) = exit { self.ports.withLock { _ = $0.insert(io.port) } }
            return .pass
        }
    }
}

private func leftPad(_ s: String, _ width: Int) -> String {
    String(repeating: " ", count: max(0, width - s.count)) + s
}

private func hex8(_ v: UInt32) -> String {
    let h = String(v, radix: 16)
    return String(repeating: "0", count: 8 - h.count) + h
}

private func fnv1a(_ s: String) -> UInt32 {
    s.utf8.reduce(0x811c_9dc5 as UInt32) { ($0 ^ UInt32($1)) &* 0x0100_0193 }
}
