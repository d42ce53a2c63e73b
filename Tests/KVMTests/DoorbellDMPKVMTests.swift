import DMP
import Logging
import Synchronization
import Testing
import VMMKit

/// Counts, between the two phase marks, the exits that DMP's doorbell fast
/// paths are there to remove: DOORBELL writes that reach the VMM (fallbacks,
/// and the warm-up before the patch), writes to the rings' kick port (a
/// synchronous append whose bounded wait ran out) and STATUS reads.
final class DoorbellExitCounter: Sendable {
    private struct Counts { var marks = 0; var doorbell = 0; var kicks = 0; var status = 0 }
    private let counts = Mutex(Counts())
    var steady: (doorbell: Int, kicks: Int) { counts.withLock { ($0.doorbell, $0.kicks) } }
    /// STATUS reads that exited in the steady phase.
    var steadyStatus: Int { counts.withLock { $0.status } }
    static let status = GuestAddress(StandardDevices.doorbellBase + DoorbellDevice.statusOffset)
    var handler: ClosureExitHandler {
        ClosureExitHandler { [self] exit, _ in
            counts.withLock { c in
                switch exit {
                case .io(let io) where io.direction == .write && io.port == StandardDevices.markerPort:
                    c.marks += 1
                case .io(let io) where io.direction == .write && io.port == StandardDevices.ringKickPort && c.marks == 1:
                    c.kicks += 1
                case .mmio(let m) where m.direction == .write && c.marks == 1
                    && m.address == GuestAddress(StandardDevices.doorbellBase + DoorbellDevice.doorbellOffset):
                    c.doorbell += 1
                case .mmio(let m) where m.direction == .read && c.marks == 1 && m.address == DoorbellExitCounter.status:
                    c.status += 1
                default:
                    break
                }
            }
            return .pass
        }
    }
}

extension KVMTests {
    @Test("DMP on c-doorbell-cpl3 (gcc -O2, synchronous ring appends): of the steady phase's doorbell writes at least 90% served in the guest (fallbacks and kicks counted as exits), identical output and checksum")
    func dmpCDoorbell() throws {
        let iters = 4000, warmup = 400
        let off = try DMPLibraryRun("c-doorbell-cpl3", commandLine: "iters=\(iters) warmup=\(warmup)", dmp: false)
        let counter = DoorbellExitCounter()
        let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
        vm.addExitHandler(counter.handler)
        let console = CapturedOutput()
        // A poller that does not sleep when the vCPU is off its CPU more than the default 2 ms (a loaded host):
        // asleep, it makes every append fall back until a kick wakes it.
        let devices = try StandardDevices.install(on: vm, console: console.sink(), ringPolling: .enabled(idleNanoseconds: 1_000_000_000))
        let loaded = try X86Boot.load(.elf(try guestImage("c-doorbell-cpl3")), commandLine: "iters=\(iters) warmup=\(warmup)", into: vm)
        var c = DMPConfiguration()
        c.use(loaded)
        c.userModeFastPaths = true
        // What the fast path serves is measured here, not whether it pays: on a host loaded enough that the vCPU
        // and the poller share a CPU, verification rightly undoes it (VerifyKVMTests pins that case).
        c.verify = false
        // For the same reason a wait bound longer than a scheduler time slice (2^20 iterations, ~25 ms): a poller
        // off its CPU (a loaded host, a sanitizer build) then makes an append wait instead of kicking (an exit);
        // the default bound is tested in VerifyKVMTests.
        c.synchronousWaitLimit = 1 << 20
        var logger = Logger(label: "test.dmp")
        logger.logLevel = .critical
        let middleware = DMPMiddleware.install(on: vm, rings: devices.rings, configuration: c, logger: logger)
        #expect(try vm.run() == .guestExit(status: 0))
        let text = console.text
        #expect(text.split(separator: "\n").filter { !$0.hasPrefix("RESULT") } == off.text.split(separator: "\n").filter { !$0.hasPrefix("RESULT") })
        #expect(resultField(text, "checksum") == resultField(off.text, "checksum"))
        #expect(devices.doorbell.completions == UInt32(iters) && devices.doorbell.error == 0)
        let site = middleware.report().first { $0.location == "db_run+0x4d" }
        #expect(site?.state == .patched, "\(middleware.report().map(\.description))")
        let steadyWrites = iters - warmup
        let (exits, kicks) = counter.steady
        #expect((exits + kicks) * 10 <= steadyWrites,
                "steady phase: \(exits) doorbell-write exits and \(kicks) kicks for \(steadyWrites) writes; poller slept \(devices.rings.pollerSleeps) times")
    }
}
