import DMP
import Dispatch
import Logging
import Synchronization
import Testing
import VMMKit

extension KVMTests {
    /// What the doorbell workloads' STATUS tests run: the steady phase is the second half, after the STATUS site
    /// is hot (64 exits, one per batch of 16 requests) and patched.
    static let statusIters = 4096, statusWarmup = 2048

    @Test("DMP serves the doorbell's STATUS reads from a shared slot: same output, exit status and reference checksum as without DMP, STATUS site served, its steady exits cut by 10x or more",
          arguments: ["c-doorbell-cpl3", "c-mmio-cpl3", "doorbell-cpl3"])
    func dmpStatusSlot(image: String) throws {
        let commandLine = "iters=\(Self.statusIters) warmup=\(Self.statusWarmup)"
        let offCounter = DoorbellExitCounter()
        let off = try DMPLibraryRun(image, commandLine: commandLine, dmp: false, prepare: { $0.addExitHandler(offCounter.handler) })
        let counter = DoorbellExitCounter()
        let on = try DMPLibraryRun(image, commandLine: commandLine, configure: { c in
            // What the fast paths serve is measured here, not whether they pay (see dmpCDoorbell): on a loaded host
            // verification may rightly undo the function copy the STATUS read shares with the DOORBELL store.
            c.verify = false
            c.synchronousWaitLimit = 1 << 16
        }, prepare: { $0.addExitHandler(counter.handler) })
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        #expect(on.lines == off.lines)
        #expect(resultField(off.text, "checksum") == "0xb0fe031e" && resultField(on.text, "checksum") == "0xb0fe031e",
                "Guests/README.md: doorbell-* at 4096 requests")
        let status = try #require(on.report.first { $0.site.kind == .mmio && $0.site.address == DoorbellExitCounter.status.rawValue },
                                  "\(on.report.map(\.description))")
        #expect(status.state == .patched && status.fastPath.hasPrefix("shared slot"), "\(status)")
        let batches = (Self.statusIters - Self.statusWarmup) / 16
        #expect(offCounter.steadyStatus >= batches, "without DMP every STATUS read exits (\(offCounter.steadyStatus))")
        #expect(counter.steadyStatus * 10 <= batches, "steady STATUS exits with DMP: \(counter.steadyStatus) of \(batches) reads")
        #expect(status.hitsServed >= UInt64(batches - counter.steadyStatus), "\(status.hitsServed) served in the guest")
    }

    @Test("a STATUS body whose enable word is clear runs the original load: the grant revoked at the steady phase's start, every steady STATUS read exits to the device, output and checksum as without DMP")
    func dmpStatusSlotRevoked() throws {
        let commandLine = "iters=\(Self.statusIters) warmup=\(Self.statusWarmup)"
        let off = try DMPLibraryRun("doorbell-cpl3", commandLine: commandLine, dmp: false)
        let counter = DoorbellExitCounter()
        let revoked = Mutex<[FastPathEnableWord]>([])
        let dmp = Mutex<DMPMiddleware?>(nil), marks = Atomic<Int>(0)
        let on = try DMPLibraryRun("doorbell-cpl3", commandLine: commandLine, configure: { c in
            c.verify = false
            c.synchronousWaitLimit = 1 << 16
        }, prepare: { vm in
            vm.addExitHandler(counter.handler)
            // At the first phase mark (the steady phase starts) the device's grant of the STATUS read ends.
            vm.addExitHandler(ClosureExitHandler { [weak vm] exit, _ in
                guard case .io(let io) = exit, io.direction == .write, io.port == StandardDevices.markerPort,
                      marks.add(1, ordering: .relaxed).newValue == 1, let vm, let m = dmp.withLock({ $0 }) else { return .pass }
                for s in m.testSeam.sharedSlots {
                    vm.bus.revokeFastPath(space: .mmio, address: s.site.address, enableWord: s.enableWord)
                    revoked.withLock { $0.append(s.enableWord) }
                }
                return .pass
            })
        }, around: { _, _, middleware, run in
            dmp.withLock { $0 = middleware }
            return try run()
        })
        #expect(on.stop == .guestExit(status: 0) && on.lines == off.lines)
        #expect(resultField(on.text, "checksum") == "0xb0fe031e" && resultField(off.text, "checksum") == "0xb0fe031e")
        let words = revoked.withLock { $0 }
        #expect(words.count == 1 && words.allSatisfy { !$0.isSet }, "the STATUS grant was live and is revoked")
        let batches = (Self.statusIters - Self.statusWarmup) / 16
        #expect(counter.steadyStatus == batches, "every steady STATUS read exits: \(counter.steadyStatus) of \(batches)")
        let status = try #require(on.report.first { $0.site.address == DoorbellExitCounter.status.rawValue })
        #expect(status.exitsWhilePatched >= batches, "the fallbacks are charged to the site: \(status.exitsWhilePatched)")
    }

    @Test("hostile: the host scribbling garbage into the STATUS slot while doorbell-cpl3 runs leaves the VMM and the device intact; only the guest's own reads are misled")
    func dmpStatusSlotGarbage() throws {
        let stop = Atomic<Bool>(false), scribbles = Atomic<Int>(0)
        var completions: UInt32 = 0, error: UInt32 = 0, status: UInt64 = 0
        let run = try DMPLibraryRun("doorbell-cpl3", commandLine: "iters=65536 warmup=1024", configure: { c in
            c.verify = false
            c.synchronousWaitLimit = 1 << 16
        }, around: { vm, devices, middleware, run in
            let done = DispatchSemaphore(value: 0)
            let memory = vm.memory
            DispatchQueue.global().async {
                defer { done.signal() }
                var garbage: UInt64 = 0x9E37_79B9_7F4A_7C15
                while !stop.load(ordering: .acquiring) {
                    let slots = middleware?.testSeam.sharedSlots ?? []
                    if slots.isEmpty { continue }
                    for _ in 0..<1000 {
                        garbage = garbage &* 6364136223846793005 &+ 1442695040888963407
                        for s in slots { try? memory.write(garbage, at: s.slot) }
                    }
                    scribbles.add(1000, ordering: .relaxed)
                }
            }
            defer {
                stop.store(true, ordering: .releasing)
                done.wait()
                completions = devices.doorbell.completions
                error = devices.doorbell.error
                status = devices.doorbell.read(offset: DoorbellDevice.statusOffset, size: 4)
            }
            return try run()
        })
        // The guest checks STATUS against its own count after every batch: garbage makes it stop with status 3
        // (its own doing); a run the scribbles never caught ends normally.
        #expect(run.stop == .guestExit(status: 3) || run.stop == .guestExit(status: 0), "\(run.stop)")
        #expect(scribbles.load(ordering: .relaxed) > 0, "the slot was scribbled")
        #expect(error == 0 && status == UInt64(completions))
        #expect(completions > 0 && completions % 16 == 0, "whole batches of 16 were completed: \(completions)")
        if run.stop == .guestExit(status: 3) { #expect(run.text.contains("doorbell: STATUS="), "\(run.text)") }
        #expect(run.report.contains { $0.fastPath.hasPrefix("shared slot") })
    }
}
