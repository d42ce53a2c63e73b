// peervmm [--dmp | --dmp-dry-run] [--check-dmp] IMAGE [COMMAND LINE...]
//
// A VMM of another package on VMMKit's public API: the standard platform
// (UART, debug exit, rings, phase marker) plus a device of its own, the
// sensor block at MMIO 0xd0100000, with a ring feeding its DATA register so
// that DMP can offer it a ring append. The guest's console goes to stdout;
// what the VMM says (the steady phase, the sensor block's registers, DMP's
// report) goes to stderr. The exit status is the guest's.
//
// --check-dmp (with --dmp): also exit with status 120 unless the sensor
// block's STATUS read and DATA write are patched and served in the guest and
// the steady phase kept fewer exits than a quarter of its samples (without DMP: two per sample).
// Without a usable /dev/kvm it prints why and exits with status 77.
import Glibc
import DMP
import PeerSensor
import VMMKit

/// Where the sensor block lives: inside the 2 MiB page the guest's boot code
/// (Guests/c/start.s with USER_DOORBELL) maps for CPL3, beside the doorbell.
let sensorBase: UInt64 = 0xD010_0000

struct Options {
    var dmp = false
    var dryRun = false
    var check = false
    var image = ""
    var commandLine = ""

    init(_ args: [String]) throws(UsageError) {
        var rest = args.dropFirst()
        while let a = rest.first, a.hasPrefix("--") {
            rest.removeFirst()
            switch a {
            case "--dmp": dmp = true
            case "--dmp-dry-run": dmp = true; dryRun = true
            case "--check-dmp": check = true
            default: throw UsageError(message: "unknown option \(a)")
            }
        }
        guard let image = rest.first else { throw UsageError(message: "no image") }
        self.image = image
        commandLine = rest.dropFirst().joined(separator: " ")
        if check && (!dmp || dryRun) { throw UsageError(message: "--check-dmp needs --dmp") }
    }
}

struct UsageError: Error { var message: String }

/// Writes a line to stderr.
func say(_ s: String) {
    let bytes = Array((s + "\n").utf8)
    var done = 0
    while done < bytes.count {
        let n = bytes[done...].withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
        if n <= 0 { return }
        done += n
    }
}

/// Boots `options.image` with the sensor block and, when asked, DMP; returns the process's exit status.
/// A function, not top-level code: closures formed at top level are main-actor isolated.
func boot(_ options: Options) throws -> Int32 {
    let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
    let console = OutputSink.standardOutput()
    let sensor = SensorBlock()
    try vm.bus.attach(sensor, mmio: GuestRange(start: GuestAddress(sensorBase), size: 0x1000))
    // Ring 2 feeds the sensor's DATA register (rings 0 and 1 are the UART's and the doorbell's).
    let devices = try StandardDevices.install(on: vm, console: console, extraRingTargets: [
        PVRingTarget(space: .mmio, address: sensorBase + SensorBlock.dataOffset, width: 4),
    ])
    // A CONTROL write applies the samples already in the ring before it changes anything (why: SensorBlock.write).
    sensor.setRingDrain { [weak rings = devices.rings] in _ = rings?.drain() }
    let loaded = try X86Boot.load(.elf(try ImageFile.read(options.image)), commandLine: options.commandLine, into: vm)

    var dmp: DMPMiddleware?
    if options.dmp {
        var config = DMPConfiguration()
        config.use(loaded)
        config.userModeFastPaths = true     // the guest is ours: CPL3 fast paths bypass its I/O permission checks
        config.dryRun = options.dryRun
        try config.validate()               // a setting outside its range: a DMPConfigurationError naming it
        say("peervmm: DMP on\(options.dryRun ? " (dry run)" : ""); user-mode fast paths enabled")
        dmp = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: config)
    }

    let reason = try vm.run()
    console.flush()
    if let steady = devices.marker.steadyPhase {
        say("peervmm: steady phase: \(steady.exits) exits in \(steady.nanoseconds / 1_000_000) ms")
    }
    say("peervmm: sensor block: count \(sensor.count) hash 0x\(String(sensor.hash, radix: 16))")
    var status: Int32
    switch reason {
    case .guestExit(let s): status = Int32(truncatingIfNeeded: s)
    default: say("peervmm: the VM stopped: \(reason)"); status = 124
    }
    if let dmp {
        let sites = dmp.report()
        say("\n" + DMPReport.text(sites, latencies: dmp.hotToPatchedNanoseconds))
        // The guest's steady phase takes 7/8 of its samples, two exits each without DMP.
        let steadySamples = Int(sensor.count) * 7 / 8
        if options.check, let failure = checkDMP(sites, steadyExits: devices.marker.steadyPhase?.exits, samples: steadySamples) {
            say("peervmm: --check-dmp: \(failure)")
            if status == 0 { status = 120 }
        }
    }
    return status
}

/// Why the run does not show the sensor block's hot sites served in the guest, or nil when it does.
func checkDMP(_ sites: [PatchSite], steadyExits: Int?, samples: Int) -> String? {
    let sensorRange = sensorBase..<(sensorBase + 0x1000)
    for (offset, direction) in [(SensorBlock.statusOffset, AccessDirection.read), (SensorBlock.dataOffset, .write)] {
        let name = offset == SensorBlock.statusOffset ? "STATUS read" : "DATA write"
        let served = sites.filter {
            $0.site.kind == .mmio && $0.site.address == sensorBase + offset && $0.site.direction == direction
        }
        guard served.contains(where: { $0.state == .patched && $0.hitsServed > 0 }) else {
            return "the sensor's \(name) is not patched and served (\(served.map(\.state.rawValue)))"
        }
    }
    if let refused = sites.first(where: { sensorRange.contains($0.site.address) && $0.state != .patched }) {
        say("peervmm: note: \(refused)")
    }
    guard let steady = steadyExits else { return "the guest marked no steady phase" }
    // Without DMP the steady phase takes two exits per sample; a quarter of an exit per sample is 87.5% of them gone
    // (measured: about 110 for 14,336 samples, over 99% gone), with room for a host that patches late.
    if steady * 4 > samples { return "\(steady) steady-phase exits, more than a quarter of \(samples) samples" }
    return nil
}

// Without a usable /dev/kvm there is nothing to run: say why and exit 77 (the conventional "skipped").
if let reason = KVMSystem.unavailableReason() {
    say("peervmm: skipped: \(reason)")
    exit(77)
}
do {
    exit(try boot(try Options(CommandLine.arguments)))
} catch let e as UsageError {
    say("peervmm: \(e.message)\nusage: peervmm [--dmp | --dmp-dry-run] [--check-dmp] IMAGE [COMMAND LINE...]")
    exit(2)
} catch {
    say("peervmm: \(error)")
    exit(125)
}
