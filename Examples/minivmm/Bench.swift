import ArgumentParser
import VMMKit

/// `minivmm bench`: the foundation's speed figures, each measured side by side in one run.
///
/// - exit path: TSC cycles from `KVM_RUN` returning to the next `KVM_RUN`
///   (decode, statistics, exit chain, UART), in-process, for uart-cpl0's exits;
/// - start-up: wall time of whole `minivmm run` processes on the demo guest,
///   and of QEMU on the same image when `qemu-system-x86_64` is installed;
/// - workloads: the guests' own cycles per iteration under minivmm, for the
///   static-PV twins, and under QEMU.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure the exit path, start-up time and workloads (minivmm vs PV twin vs QEMU).")

    @Option(help: "Guest directory holding the workload images.")
    var guests: String = "Guests"

    @Option(help: "Whole-process start-up runs per VMM.")
    var startupRuns: Int = 20

    @Option(help: "QEMU start-up runs (each takes seconds).")
    var qemuRuns: Int = 3

    @Flag(help: "Skip QEMU even when it is installed.")
    var noQemu = false

    @Option(help: "Workload iterations for uart-cpl0/uart-cpl3 (doorbell uses 16x).")
    var iters: Int = 200

    func run() throws {
        let qemu = noQemu ? nil : findExecutable("qemu-system-x86_64")
        try exitPath()
        try startup(qemu: qemu)
        try workloads(qemu: qemu)
    }

    // MARK: exit path

    func exitPath() throws {
        let tscPerNs = calibrateTSC()
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        let devices = try StandardDevices.install(on: vm, console: OutputSink { _ in })
        _ = devices
        _ = try X86Boot.load(.elf(try readFile(guests + "/uart-cpl0.elf")), commandLine: "iters=\(iters)", into: vm)
        guard let kvcpu = vm.vcpus[0].backend as? KVMVCPU else { throw ValidationError("not a KVM vCPU") }
        let probe = ExitPathProbe(capacity: 1 << 20)
        kvcpu.exitPathProbe = probe
        _ = try vm.run()
        let ns = probe.samples.map { Double($0) / tscPerNs }.sorted()
        guard !ns.isEmpty else { return }
        func pct(_ p: Double) -> Double { ns[min(ns.count - 1, Int(Double(ns.count) * p))] }
        print("exit path (KVM_RUN return -> next KVM_RUN, uart-cpl0, \(ns.count) exits, in-process):")
        print("  median \(fmt(pct(0.5))) ns   p90 \(fmt(pct(0.9))) ns   p99 \(fmt(pct(0.99))) ns   (TSC \(fmt(tscPerNs)) GHz)")
    }

    // MARK: start-up

    func startup(qemu: String?) throws {
        let me = selfExecutable()
        var ours: [Double] = []
        for _ in 0..<max(1, startupRuns) {
            let r = try spawn([me, "run"])
            guard r.status == 0, r.output.contains("Hello from the VMMKit") else {
                throw ValidationError("minivmm run failed: status \(r.status): \(r.output)")
            }
            ours.append(r.milliseconds)
        }
        print("start-up, whole process, hello guest (\(ours.count) runs): minivmm median \(fmt(median(ours))) ms")
        guard let qemu else { print("  (qemu-system-x86_64 not installed: no QEMU figure)"); return }
        var theirs: [Double] = []
        for _ in 0..<max(1, qemuRuns) {
            let r = try spawn([qemu] + qemuArgs(guests + "/hello.elf", append: ""))
            guard r.status == 1 else { throw ValidationError("QEMU hello failed: status \(r.status)") }
            theirs.append(r.milliseconds)
        }
        print("  QEMU median \(fmt(median(theirs))) ms (\(theirs.count) runs); ratio QEMU/minivmm \(fmt(median(theirs) / median(ours)))x")
    }

    // MARK: workloads

    func workloads(qemu: String?) throws {
        print("workloads (guest-reported TSC cycles per iteration in the steady phase):")
        print("  " + pad("workload", 16) + pad("minivmm", 12, right: true) + pad("static PV", 12, right: true)
              + pad("QEMU", 12, right: true) + pad("exits", 10, right: true) + pad("PV exits", 10, right: true) + "  minivmm/PV  QEMU/minivmm")
        for name in ["uart-cpl0", "uart-cpl3", "doorbell-cpl3"] {
            let n = name.hasPrefix("doorbell") ? iters * 16 : iters
            let args = "iters=\(n)"
            let plain = try inProcess(name, args)
            let pv = try inProcess(name + "-pv", args)
            var q: Double?
            if let qemu {
                let r = try spawn([qemu] + qemuArgs(guests + "/" + name + ".elf", append: args))
                q = field(r.output, "cycles_per_iter").flatMap(Double.init)
                if q == nil { q = nil; print("  (\(name) under QEMU: \(r.output.split(separator: "\n").last ?? "no output"))") }
            }
            guard plain.checksum == pv.checksum else {
                throw ValidationError("\(name): checksum \(plain.checksum) differs from its PV twin's \(pv.checksum)")
            }
            var line = "  " + pad(name, 16) + pad(fmt(plain.cycles), 12, right: true) + pad(fmt(pv.cycles), 12, right: true)
            line += pad(q.map(fmt) ?? "-", 12, right: true) + pad(String(plain.exits), 10, right: true) + pad(String(pv.exits), 10, right: true)
            line += "  " + pad(fmt(plain.cycles / pv.cycles) + "x", 10) + "  " + (q.map { fmt($0 / plain.cycles) + "x" } ?? "-")
            print(line)
        }
    }

    struct WorkloadResult { var cycles: Double; var checksum: String; var exits: Int }

    func inProcess(_ name: String, _ args: String) throws -> WorkloadResult {
        let out = CapturedOutput()
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        let devices = try StandardDevices.install(on: vm, console: out.sink())
        _ = try X86Boot.load(.elf(try readFile(guests + "/" + name + ".elf")), commandLine: args, into: vm)
        guard case .guestExit(0) = try vm.run() else { throw ValidationError("\(name) did not exit with 0") }
        guard let c = field(out.text, "cycles_per_iter").flatMap(Double.init), let sum = field(out.text, "checksum") else {
            throw ValidationError("\(name): no RESULT line")
        }
        return WorkloadResult(cycles: c, checksum: sum, exits: devices.marker.steadyPhase?.exits ?? vm.statistics().total)
    }

    func qemuArgs(_ image: String, append: String) -> [String] {
        ["-accel", "kvm", "-cpu", "EPYC", "-m", "256", "-kernel", image, "-append", append,
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none", "-no-reboot",
         "-monitor", "none", "-nodefaults"]
    }
}

func field(_ text: String, _ key: String) -> String? {
    guard let line = text.split(separator: "\n").last(where: { $0.hasPrefix("RESULT ") }) else { return nil }
    for w in line.split(separator: " ") where w.hasPrefix(key + "=") { return String(w.dropFirst(key.count + 1)) }
    return nil
}

func median(_ v: [Double]) -> Double {
    let s = v.sorted()
    return s.isEmpty ? 0 : s[s.count / 2]
}

func fmt(_ v: Double) -> String {
    if v >= 100 { return String(Int(v.rounded())) }
    let r = (v * 100).rounded() / 100
    return String(r)
}
