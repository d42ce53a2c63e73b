import VMMKit

/// How ``FastPathHarness`` runs; the faults exist to show that the properties catch them.
public struct FastPathHarnessOptions: Sendable {
    /// Guest vCPUs: 1 also checks program order; 2 lets vCPU 1 change the device's configuration mid-stream.
    public var vcpus: Int
    /// Scheduler steps per program.
    public var steps: Int
    /// Fault: serve reads as if every read fast path were independent of pending ring entries.
    public var assumeIndependentReads: Bool
    /// Fault: apply synchronous ring appends asynchronously.
    public var ignoreSynchronous: Bool
    /// Fault: ignore the enable words (serve every granted fast path always).
    public var ignoreEnableWords: Bool
    /// Give the device the ring drain it asks for (``FastPathSubject/connect(_:drain:)``).
    public var connectRingDrain: Bool
    /// Run the subject's host actions (``FastPathSubject/hostAction(_:)``, e.g. a timer tick or a UART's input); default on.
    public var hostActions: Bool

    /// Options; the defaults inject no fault.
    public init(vcpus: Int = 1, steps: Int = 400, assumeIndependentReads: Bool = false, ignoreSynchronous: Bool = false,
                ignoreEnableWords: Bool = false, connectRingDrain: Bool = true, hostActions: Bool = true) {
        self.vcpus = vcpus; self.steps = steps; self.assumeIndependentReads = assumeIndependentReads
        self.ignoreSynchronous = ignoreSynchronous; self.ignoreEnableWords = ignoreEnableWords
        self.connectRingDrain = connectRingDrain; self.hostActions = hostActions
    }
}
