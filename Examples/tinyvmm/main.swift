// tinyvmm: a complete VMM on VMMKit's public API. It boots an ELF64 guest
// (PVH note or 64-bit entry) with a COM1 UART and QEMU's debug-exit port,
// and counts the guest's port I/O exits on the way.
//
//     tinyvmm IMAGE [GUEST COMMAND LINE...]
import Foundation
import Synchronization
import VMMKit

/// Exit handlers run on vCPU threads, so the counter is atomic.
final class ExitCounter: Sendable {
    let count = Atomic<Int>(0)
}

/// A function, not top-level code: a closure formed in top-level code is
/// main-actor isolated, and this one runs on a vCPU thread.
func boot(_ image: [UInt8], commandLine: String) throws -> (StopReason, Int) {
    let kvm = try KVMSystem()
    let vm = try VirtualMachine(backend: kvm, configuration: VMConfiguration(memorySize: 64 << 20))
    let console = OutputSink.standardOutput()
    defer { console.flush() }
    try vm.bus.attach(UART8250(sink: console), ports: 0x3f8..<0x400)
    try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)
    let portIO = ExitCounter()
    vm.addExitHandler(ClosureExitHandler { exit, _ in
        if case .io = exit { portIO.count.wrappingAdd(1, ordering: .relaxed) }
        return .pass // not consumed: the bus still serves the access
    })
    _ = try X86Boot.load(.elf(image), commandLine: commandLine, into: vm)
    let reason = try vm.run()
    return (reason, portIO.count.load(ordering: .relaxed))
}

let arguments = CommandLine.arguments
guard arguments.count >= 2, let file = FileManager.default.contents(atPath: arguments[1]) else {
    print("usage: tinyvmm IMAGE [GUEST COMMAND LINE...]")
    exit(2)
}
do {
    let (reason, exits) = try boot([UInt8](file), commandLine: arguments.dropFirst(2).joined(separator: " "))
    print("tinyvmm: \(reason); \(exits) port I/O exits")
} catch {
    print("tinyvmm: \(error)")
    exit(125)
}
