// tinyvmm IMAGE [COMMAND LINE]: a whole VMM on VMMKit's public API.
import Glibc
import VMMKit

/// The guest's console, and tinyvmm's own lines through the same sink, so
/// the two stay in order when standard output is a pipe or a file.
let console = OutputSink.standardOutput()

/// Writes one line of tinyvmm's own to the console.
@Sendable func say(_ line: String) {
    for b in (line + "\n").utf8 { console.put(b) }
}

/// A function, not top-level code: closures formed at top level are main-actor
/// isolated, and an exit handler runs on a vCPU thread.
func boot(_ path: String, _ commandLine: String) throws -> StopReason {
    let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
    defer { console.flush() }
    try vm.bus.attach(UART8250(sink: console), ports: 0x3f8..<0x400)    // COM1
    try vm.bus.attach(DebugExitDevice(), ports: 0xf4..<0xf8)           // QEMU's isa-debug-exit
    vm.addExitHandler(ClosureExitHandler { exit, _ in                  // a middleware: watch, pass on
        if case .mmio(let m) = exit { say("tinyvmm: MMIO \(m.direction) at \(m.address)") }
        return .pass
    })
    _ = try X86Boot.load(.elf(try ImageFile.read(path)), commandLine: commandLine, into: vm)
    return try vm.run()
}

let args = CommandLine.arguments
guard args.count >= 2 else { print("usage: tinyvmm IMAGE [COMMAND LINE]"); exit(2) }
do { say("tinyvmm: \(try boot(args[1], args.dropFirst(2).joined(separator: " ")))") } catch { say("tinyvmm: \(error)"); console.flush(); exit(125) }
console.flush()
