import VMMKit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A record of everything the mock backend was asked to do, shared by a hypervisor's VMs and vCPUs.
public final class MockCallLog: @unchecked Sendable {
    private let lock = Locked<[MockCall]>([])
    /// Per operation, what its next calls do: an errno to fail with, or nil to succeed (``inject(_:into:count:skipping:)``).
    private let failures = Locked<[MockOperation: [Errno?]]>([:])

    init() {}

    /// Every call so far, in order.
    public var calls: [MockCall] { lock.withLock { $0 } }

    /// The calls of one operation.
    public func calls(_ op: MockOperation) -> [MockCall] { calls.filter { $0.operation == op } }

    /// The most calls one ``inject(_:into:count:skipping:)`` queues for `count` and for `skipping` each: 2^20.
    public static let maximumInjectionCount = 1 << 20

    /// Makes the next `count` calls of `op` fail with `errno` (queued after earlier injections); with
    /// `skipping`, the first `skipping` of those calls succeed and the `count` after them fail (fault injection
    /// at the k-th call of an operation from a given moment). `count` and `skipping` are clamped to
    /// 0...``maximumInjectionCount`` (a negative one queues nothing).
    public func inject(_ errno: Errno, into op: MockOperation, count: Int = 1, skipping: Int = 0) {
        let limit = MockCallLog.maximumInjectionCount
        failures.withLock {
            $0[op, default: []].append(contentsOf: Array(repeating: nil, count: min(max(0, skipping), limit))
                                       + Array(repeating: errno, count: min(max(0, count), limit)))
        }
    }

    func record(_ op: MockOperation, vcpu: Int? = nil, _ detail: String = "") throws(BackendError) {
        lock.withLock { $0.append(MockCall(operation: op, vcpu: vcpu, detail: detail)) }
        let injected: Errno? = failures.withLock { f in
            guard var list = f[op], !list.isEmpty else { return nil }
            let e = list.removeFirst()
            f[op] = list.isEmpty ? nil : list
            return e
        }
        if let e = injected { throw BackendError(op.rawValue, errno: e, detail: "injected by the mock backend") }
    }

    /// Errors injected but not yet delivered.
    public var undeliveredFailures: [MockOperation: [Errno]] {
        failures.withLock { $0.compactMapValues { list in list.contains { $0 != nil } ? list.compactMap { $0 } : nil } }
    }
}
