#if canImport(Glibc)
import Glibc
#endif

/// What `--realtime-priority N` came to (``becomeRealtime(priority:busyThreads:)``): `SCHED_FIFO` applied to
/// minivmm's threads, or not and why. `run` and `bench` say it on stderr; `bench --json` gives it as the
/// `realtime` field of every record.
struct RealtimeOutcome: Equatable, Sendable {
    /// Why the policy was not applied.
    enum Refusal: Equatable, Sendable {
        /// Fewer host CPUs allowed than busy threads (real-time threads spinning on one CPU starve each other): not tried.
        case tooFewCPUs(busyThreads: Int, allowed: Int)
        /// The host refused `pthread_setschedparam` with `errno` (`text`: its `strerror`). For `EPERM`,
        /// `rtprioLimit` is the soft `RLIMIT_RTPRIO` (nil: unlimited or unreadable): without `CAP_SYS_NICE` a
        /// priority above it is refused.
        case host(errno: Int32, text: String, rtprioLimit: UInt64?)
    }

    /// The priority asked for (1...99).
    var priority: Int32
    /// Why it was not applied; nil when it was.
    var refusal: Refusal?

    /// Whether the threads run under `SCHED_FIFO` at ``priority``.
    var applied: Bool { refusal == nil }

    /// The errno's symbolic name (`EPERM`), for a host refusal.
    var errnoName: String? {
        guard case .host(let e, _, _) = refusal else { return nil }
        return RealtimeOutcome.errnoNames[e] ?? "errno \(e)"
    }

    /// Why it was not applied, for people; nil when it was.
    var reason: String? {
        switch refusal {
        case nil:
            return nil
        case .tooFewCPUs(let busy, let allowed):
            return "\(busy) busy threads (vCPUs and the ring poller) need as many host CPUs; \(allowed) allowed"
        case .host(let e, let text, let limit):
            var why = "pthread_setschedparam failed with \(errnoName ?? "errno \(e)") (\(text))"
            if e == EPERM {
                why += ": it needs CAP_SYS_NICE, or RLIMIT_RTPRIO of at least \(priority)"
                    + (limit.map { " (it is \($0); raise it with ulimit -r or limits.conf's rtprio)" } ?? "")
            }
            return why
        }
    }

    /// The line for stderr, after `tool: ` (`minivmm`, `bench`).
    func message(_ tool: String) -> String {
        guard let reason else {
            return "\(tool): --realtime-priority \(priority) applied: minivmm's threads (vCPUs, ring poller, timer) run under SCHED_FIFO \(priority)"
        }
        return "\(tool): --realtime-priority \(priority) not applied (the host's default policy stays): \(reason)"
    }

    /// `{"priority": N, "applied": true}`, or with `"errno"` (a host refusal's name, else null) and `"reason"`.
    var json: JSONValue {
        var fields: [(String, JSONValue)] = [("priority", .int(Int(priority))), ("applied", .bool(applied))]
        if let reason {
            fields.append(("errno", errnoName.map(JSONValue.string) ?? .null))
            fields.append(("reason", .string(reason)))
        }
        return .object(fields)
    }

    /// The errnos `pthread_setschedparam` returns.
    static let errnoNames: [Int32: String] = [EPERM: "EPERM", ESRCH: "ESRCH", EINVAL: "EINVAL", ENOTSUP: "ENOTSUP"]
}
