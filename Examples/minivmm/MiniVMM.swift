import ArgumentParser
import DMP
import Logging
import VMMKit
import X86Disassembler

@main
struct MiniVMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "minivmm",
        abstract: "A minimal VMM built with VMMKit: runs a guest image on KVM.",
        subcommands: [Run.self, Bench.self, GuardBench.self, ExitPathBench.self, DetectorBench.self, DMPLatencyBench.self],
        defaultSubcommand: Run.self)
}

/// Options shared by `run` and `bench`.
struct GuestOptions: ParsableArguments {
    @Option(help: "Guest image: ELF64 (PVH note honoured) or flat binary. Default: the bundled demo guest.")
    var kernel: String?

    @Option(help: "Guest command line.")
    var append: String = ""

    @Option(help: "Guest memory, e.g. 256M, 1G (minimum 32M).")
    var memory: String = "256M"

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Flag(help: "Stop with an error when the guest touches a port or address no device claims.")
    var strict = false

    @Flag(inversion: .prefixedNo, help: "Consume the paravirtual rings with a polling thread while the guest runs.")
    var ringPoll = true

    @Option(help: "Microseconds the ring poller keeps polling without entries before it sleeps.")
    var ringPollIdle: UInt64 = 2000

    @Option(help: "Spin-wait hints between two looks of the ring poller at the rings (latency against cache traffic).")
    var ringPollSpins: Int = 16

    @Option(help: "Run the VM's threads (vCPUs, ring poller, timer) under SCHED_FIFO at this priority (1-99), so other busy host threads cannot take their CPUs (a ring producer falls back to exits while the poller is off its CPU). Taken only with a host CPU per vCPU and one for the poller.")
    var realtimePriority: Int32?

    @Option(help: "Slots per paravirtual ring (a power of two, 2-32768; above 512 the doorbell's ring moves past where the static-PV guests look for it).")
    var ringSlots: UInt32 = 512

    var ringPolling: PVRingPolling {
        guard ringPoll else { return .disabled }
        return .enabled(idleNanoseconds: ringPollIdle > UInt64.max / 1000 ? UInt64.max : ringPollIdle * 1000,
                        spinsBetweenChecks: min(max(ringPollSpins, 1), 1 << 20))
    }

    func memoryBytes() throws -> UInt64 {
        guard let v = parseSize(memory) else { throw ValidationError("bad --memory '\(memory)': use e.g. 256M or 1G") }
        return v
    }

    /// Bad `--memory`/`--cpus` values are usage errors (exit 64, with the usage), like every other.
    func validate() throws {
        let bytes = try memoryBytes()
        guard bytes >= X86Layout.minimumMemory, bytes <= 1 << 40, bytes % 4096 == 0 else {
            throw ValidationError("bad --memory '\(memory)': use a multiple of 4K from 32M to 1T, e.g. 256M or 1G")
        }
        guard (1...256).contains(cpus) else { throw ValidationError("bad --cpus \(cpus): use 1 to 256") }
        if let p = realtimePriority, !(1...99).contains(p) { throw ValidationError("bad --realtime-priority \(p): use 1 to 99") }
        try validateRingSlots(ringSlots)
    }

    func image() throws -> (BootImage, String) {
        guard let path = kernel else { return (.elf(demoGuestImage), "demo guest (hello)") }
        let bytes = try readFile(path)
        if bytes.starts(with: [0x7f, 0x45, 0x4c, 0x46]) { return (.elf(bytes), path) }
        return (.flat(bytes), path)
    }
}

func pad(_ s: String, _ n: Int, right: Bool = false) -> String {
    // A left-aligned value that fills its column still gets one space before the next one.
    let p = String(repeating: " ", count: max(right ? 0 : 1, n - s.count))
    return right ? p + s + " " : s + p
}
