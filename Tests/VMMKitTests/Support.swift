import Synchronization
import VMMKit
import VMMKitTesting

/// A device that records accesses and answers reads with a value.
/// The bus calls devices from every vCPU thread at once, so the records are locked.
final class RecordingDevice: BusDevice, @unchecked Sendable {
    let name: String
    let readValue: UInt64
    private let log = Mutex<(writes: [(offset: UInt64, size: Int, value: UInt64)], reads: [(offset: UInt64, size: Int)])>(([], []))
    var writes: [(offset: UInt64, size: Int, value: UInt64)] { log.withLock { $0.writes } }
    var reads: [(offset: UInt64, size: Int)] { log.withLock { $0.reads } }
    init(name: String = "recorder", readValue: UInt64 = 0) { self.name = name; self.readValue = readValue }
    func read(offset: UInt64, size: Int) -> UInt64 { log.withLock { $0.reads.append((offset, size)) }; return readValue &+ offset }
    func write(offset: UInt64, size: Int, value: UInt64) -> DeviceEffect { log.withLock { $0.writes.append((offset, size, value)) }; return .none }
}

/// A handler that records the exits it sees and answers with a fixed result.
final class ProbeHandler: ExitHandler {
    let name: String
    let result: ExitResult
    let order: OrderLog
    init(_ name: String, _ result: ExitResult, _ order: OrderLog) { self.name = name; self.result = result; self.order = order }
    /// Sees only port I/O exits (so the HLT a finished mock script returns still stops the vCPU).
    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        guard case .io = exit else { return .pass }
        order.append(name)
        return result
    }
}

final class OrderLog: @unchecked Sendable {
    var names: [String] = []
    func append(_ s: String) { names.append(s) }
}

func makeVM(_ mock: MockHypervisor, vcpus: Int = 1, strict: Bool = false, memory: UInt64 = 4 << 20) throws -> VirtualMachine {
    var c = VMConfiguration(memorySize: memory, vcpuCount: vcpus)
    c.strict = strict
    return try VirtualMachine(backend: mock, configuration: c)
}

func out(_ port: UInt16, _ value: UInt64, size: UInt8 = 1) -> MockStep {
    .exit(.io(PortIO(port: port, size: size, direction: .write, value: value)))
}

let debugExit3 = out(0xf4, 3)
