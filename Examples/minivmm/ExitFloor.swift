import ArgumentParser
import VMMKit

/// The exit floor: the same image, memory and boot setup as minivmm's `full`
/// variant (a ``VirtualMachine`` of 64 MiB, ``X86Boot`` loading the image),
/// but run through the backend layer alone: a bare `KVM_RUN` loop on the
/// ``KVMVCPU`` on the calling thread that answers the UART's line-status
/// read (THR empty), keeps the last bytes written to the THR (to read the
/// guest's RESULT line), counts exits between the phase marks, stops at the
/// debug-exit port and drops everything else. No exit chain, no bus, no
/// statistics, no vCPU or timer thread.
enum ExitFloor {
    /// The line-status register and its value when the THR is empty (THRE | TEMT).
    static let lineStatusPort: UInt16 = 0x3fd
    static let lineStatusEmpty: UInt64 = 0x60

    /// Runs `image` with `iterations` and returns what its RESULT line reports.
    static func run(_ image: String, iterations: Int) throws -> BenchRun {
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        _ = try X86Boot.load(.elf(try readFile(image)), commandLine: "iters=\(iterations)", into: vm)
        guard let vcpu = vm.vcpus.first?.backend as? KVMVCPU else { throw ValidationError("the exit floor needs a KVM vCPU") }
        var tail = [UInt8](repeating: 0, count: 256)
        var written = 0
        var exits = 0
        var marks = (start: 0, end: 0)
        var status: UInt64?
        // Bounded: a guest that never writes the debug-exit port ends the loop after 2^40 exits.
        loop: for _ in 0..<(1 << 40) {
            let exit = try vcpu.run()
            switch exit {
            case .interrupted:
                continue
            case .io(let io):
                exits += 1
                if io.direction == .read {
                    if io.port == lineStatusPort { vcpu.setExitData(lineStatusEmpty, at: 0) }
                    continue
                }
                switch io.port {
                case 0x3f8:
                    tail[written & 255] = UInt8(truncatingIfNeeded: io.value)
                    written &+= 1
                case StandardDevices.markerPort:
                    if io.value == 1 { marks.start = exits } else if io.value == 2 { marks.end = exits }
                case 0xf4:
                    status = io.value
                    break loop
                default:
                    break
                }
            case .mmio:
                exits += 1
            default:
                throw ValidationError("exit floor: unexpected exit \(exit)")
            }
        }
        guard status == 0 else { throw ValidationError("exit floor: \(image) exited with \(status.map(String.init) ?? "nothing")") }
        let n = min(written, tail.count)
        let text = String(decoding: (written - n..<written).map { tail[$0 & 255] }, as: UTF8.self)
        var run = try BenchRun(result: text, "exit floor on \(image)")
        run.steadyExits = marks.end - marks.start
        return run
    }

    /// Runs the C exit floor (`Benchmarks/ExitFloorC`, built at `program`) on `image`.
    static func runC(_ program: String, _ image: String, iterations: Int) throws -> BenchRun {
        let r = try spawn([program, image, "iters=\(iterations)"])
        guard r.status == 0 else { throw ValidationError("\(program): status \(r.status): \(r.output.suffix(200))") }
        var run = try BenchRun(result: r.output, "\(program) on \(image)")
        run.steadyExits = r.output.split(separator: "\n").last { $0.hasPrefix("exits=") }.flatMap { Int($0.dropFirst(6)) }
        return run
    }

    /// One floor/full pair (and the C floor's run when it took part).
    struct Pair {
        var floor: BenchRun
        var full: BenchRun
        var cFloor: BenchRun?
        /// How much more a steady-phase iteration costs under minivmm than at the floor.
        var gap: Double { full.cyclesPerIteration / floor.cyclesPerIteration - 1 }
    }

    /// `pairs` interleaved floor/full runs of `workload` (alternating which goes first),
    /// each followed by a run of the C floor at `cProgram` when given.
    static func pairs(_ workload: BenchWorkload, iterations: Int, pairs: Int, cProgram: String?, _ env: BenchEnvironment,
                      progress: (String) -> Void) throws -> [Pair] {
        let image = env.guests + "/" + workload.name + ".elf"
        var result: [Pair] = []
        for i in 0..<max(1, pairs) {
            progress("exit floor: pair \(i + 1) of \(pairs)")
            var floor: BenchRun?
            var full: BenchRun?
            for side in (i % 2 == 0 ? [0, 1] : [1, 0]) {
                if side == 0 { floor = try run(image, iterations: iterations) }
                else { full = try BenchVariant.full.run(workload, iterations, env) }
            }
            guard let floor, let full else { continue }
            guard floor.checksum == full.checksum else {
                throw ValidationError("exit floor: checksum \(floor.checksum), minivmm's \(full.checksum)")
            }
            let c = try cProgram.map { try runC($0, image, iterations: iterations) }
            if let c, c.checksum != full.checksum {
                throw ValidationError("C exit floor: checksum \(c.checksum), minivmm's \(full.checksum)")
            }
            result.append(Pair(floor: floor, full: full, cFloor: c))
        }
        return result
    }
}
