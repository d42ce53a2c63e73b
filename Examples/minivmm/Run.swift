import ArgumentParser
import VMMKit

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a guest until it exits.")

    @OptionGroup var guest: GuestOptions

    @Flag(help: "Print an exit profile (counts per exit kind and the top exit sites) to stderr.")
    var profile = false

    @Flag(help: "Exit with QEMU's isa-debug-exit status (v << 1) | 1 instead of v.")
    var qemuExitStatus = false

    @OptionGroup var dmp: DMPOptions

    func run() throws {
        let session: Session
        do {
            session = try Session(options: guest, profile: profile, dmp: dmp.configuration())
        } catch {
            printError("minivmm: \(error)")
            throw ExitCode(125)
        }
        let interrupted = stopOnInterrupt(session.vm)
        let reason: StopReason
        do {
            reason = try session.vm.run()
        } catch {
            session.console.flush()
            printError("minivmm: \(error)")
            if profile { session.printProfile() }
            session.printDMPReport()
            throw ExitCode(125)
        }
        if profile { session.printProfile() }
        session.printDMPReport()
        switch reason {
        case .guestExit(let v):
            let code = qemuExitStatus ? Int32(truncatingIfNeeded: (v << 1) | 1) : Int32(truncatingIfNeeded: v)
            throw ExitCode(code & 0xff)
        case .stopped:
            throw ExitCode(interrupted.raised ? 130 : 0)
        case .halted:
            throw ExitCode(0)
        case .systemEvent(let t):
            printError("minivmm: guest system event \(t)")
            throw ExitCode(0)
        }
    }
}

/// Refuses a `--ring-slots` value ``StandardDevices`` cannot lay out.
func validateRingSlots(_ slots: UInt32) throws {
    guard slots >= 2, slots <= StandardDevices.maximumRingSlotCount, slots & (slots - 1) == 0 else {
        throw ValidationError("bad --ring-slots \(slots): use a power of two from 2 to \(StandardDevices.maximumRingSlotCount)")
    }
}
