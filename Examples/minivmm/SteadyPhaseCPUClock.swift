import Synchronization
import VMMKit

/// Samples the process's CPU time (every thread: vCPUs, timer, ring poller)
/// when the guest marks the steady phase. It sits before the phase marker in
/// the chain and passes every exit on.
final class SteadyPhaseCPUClock: ExitHandler, Sendable {
    private let marks = Mutex<(start: UInt64?, end: UInt64?)>((nil, nil))
    /// The ring device whose counters are sampled at the marks (set once the devices are installed).
    private let rings = Mutex<PVRingDevice?>(nil)
    private let ringMarks = Mutex<(start: RingCounters?, end: RingCounters?)>((nil, nil))

    /// Samples `device`'s counters at the marks too (``steadyRing``).
    func sampleRings(of device: PVRingDevice) { rings.withLock { $0 = device } }

    /// Records the CPU time (and the ring counters) at marks 1 and 2; passes every exit on.
    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        guard case .io(let io) = exit, io.port == StandardDevices.markerPort, io.direction == .write else { return .pass }
        let now = processCPUNanoseconds()
        let counters = rings.withLock { $0 }.map(RingCounters.init)
        marks.withLock { m in
            if io.value == 1, m.start == nil { m.start = now }
            if io.value == 2, m.start != nil, m.end == nil { m.end = now }
        }
        ringMarks.withLock { m in
            if io.value == 1, m.start == nil { m.start = counters }
            if io.value == 2, m.start != nil, m.end == nil { m.end = counters }
        }
        return .pass
    }

    /// The ring counters from mark 1 to mark 2, if both came.
    var steadyRing: RingCounters? {
        ringMarks.withLock { m in
            guard let s = m.start, let e = m.end else { return nil }
            return e.since(s)
        }
    }

    /// CPU nanoseconds between mark 1 and mark 2, if both came.
    var steadyNanoseconds: UInt64? {
        marks.withLock { m in
            guard let s = m.start, let e = m.end, e >= s else { return nil }
            return e - s
        }
    }
}
