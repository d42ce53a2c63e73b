/// A snapshot taken when the guest marks a phase on the marker port.
public struct PhaseMark: Hashable, Sendable {
    /// The value the guest wrote (1 = steady phase begins, 2 = it ends).
    public var value: UInt32
    /// Host monotonic time in nanoseconds.
    public var nanoseconds: UInt64
    /// Exits of the marking vCPU so far (all kinds but interrupted).
    public var exits: Int
}

/// Records the guest's phase marks: the workload guests write 1 to the marker
/// port when their steady phase begins and 2 when it ends, so a VMM can
/// report exits and time for the steady phase alone.
public final class PhaseMarker: ExitHandler, @unchecked Sendable {
    /// The marker port (``StandardDevices`` uses 0x700).
    public let port: UInt16
    private let lock = ConditionLock()
    private var recorded: [PhaseMark] = []

    /// How many marks are kept (later ones are dropped).
    public static let markLimit = 1024

    /// A marker on `port`. It is an exit handler, not a bus device, and offers
    /// no fast path: each write records the time and the vCPU's exit count.
    public init(port: UInt16) { self.port = port }

    /// The marks recorded so far.
    public var marks: [PhaseMark] { lock.withLock { recorded } }

    /// Exits and nanoseconds between the first mark 1 and the following mark 2, if both happened.
    public var steadyPhase: (exits: Int, nanoseconds: UInt64)? {
        let m = marks
        guard let b = m.firstIndex(where: { $0.value == 1 }),
              let e = m[b...].firstIndex(where: { $0.value == 2 }) else { return nil }
        guard m[e].exits >= m[b].exits, m[e].nanoseconds >= m[b].nanoseconds else { return nil }
        return (m[e].exits - m[b].exits, m[e].nanoseconds - m[b].nanoseconds)
    }

    /// The marker is a port.
    public var exitKinds: Set<ExitKind>? { [.io] }

    /// Consumes writes to the marker port.
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        guard case .io(let io) = exit, io.port == port else { return .pass }
        if io.direction == .write {
            let mark = PhaseMark(value: UInt32(truncatingIfNeeded: io.value), nanoseconds: Sys.monotonicNanoseconds(),
                                 exits: context.totalExits)
            lock.withLock { if recorded.count < PhaseMarker.markLimit { recorded.append(mark) } }
        } else {
            // Every element of a string read, not just the first.
            for i in 0..<max(1, Int(io.count)) { context.completeRead(allOnes(size: Int(io.size)), at: i) }
        }
        return .handled
    }
}
