import ArgumentParser
import Synchronization

/// Runs the workloads under QEMU. The host CPU time of QEMU's steady phase
/// cannot be sampled from outside, so it is estimated: the whole process's
/// CPU time (`wait4`) of this run minus that of the last shorter run of the
/// same image, divided by the difference in iterations (boot and firmware cancel out).
enum QEMURunner {
    private static let baseline = Mutex<[String: (iterations: Int, cpu: Double)]>([:])

    static func run(_ qemu: String, image: String, iterations: Int) throws -> BenchRun {
        let r = try spawn([qemu] + qemuArguments(image, append: "iters=\(iterations)"))
        guard r.status == 1 else {
            throw ValidationError("QEMU on \(image): status \(r.status): \(r.output.suffix(200))")
        }
        var run = try BenchRun(result: r.output, "QEMU on \(image)")
        run.hostCPUNanosecondsPerIteration = baseline.withLock { b -> Double? in
            if let base = b[image], base.iterations < iterations {
                return (r.cpuNanoseconds - base.cpu) / Double(iterations - base.iterations)
            }
            b[image] = (iterations, r.cpuNanoseconds)
            return nil
        }
        return run
    }
}

/// QEMU's command line for a workload image (MACHINE.md: `-cpu EPYC`, isa-debug-exit on 0xf4).
func qemuArguments(_ image: String, append: String) -> [String] {
    ["-accel", "kvm", "-cpu", "EPYC", "-m", "256", "-kernel", image, "-append", append,
     "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none", "-no-reboot",
     "-monitor", "none", "-nodefaults"]
}
