import Glibc
import CKVM

/// The calling thread's host CPU affinity (`sched_getaffinity`/`sched_setaffinity` on the caller, through the shim).
/// New threads inherit the affinity of the thread that creates them.
enum HostCPUAffinity {
    /// The CPUs the shim's masks cover (glibc's `CPU_SETSIZE`).
    static let limit = 1024

    /// The CPUs the calling thread may run on, ascending (empty if the kernel would not say).
    static func current() -> [Int] {
        var mask = [UInt64](repeating: 0, count: limit / 64)
        guard mask.withUnsafeMutableBufferPointer({ ckvm_get_affinity($0.baseAddress, $0.count) }) == 0 else { return [] }
        return (0..<limit).filter { mask[$0 / 64] & (1 << UInt64($0 % 64)) != 0 }
    }

    /// Restricts the calling thread to `cpus`. Throws with errno when the kernel refuses (a CPU offline
    /// or outside the cpuset) or a CPU number is outside `0..<limit`.
    static func set(_ cpus: [Int]) throws(BackendError) {
        guard !cpus.isEmpty, cpus.allSatisfy({ $0 >= 0 && $0 < limit }) else {
            throw BackendError("sched_setaffinity", errno: Errno(rawValue: EINVAL), detail: "CPUs \(cpus)")
        }
        var mask = [UInt64](repeating: 0, count: limit / 64)
        for c in cpus { mask[c / 64] |= 1 << UInt64(c % 64) }
        let r = mask.withUnsafeBufferPointer { ckvm_set_affinity($0.baseAddress, $0.count) }
        guard r == 0 else { throw BackendError("sched_setaffinity", errno: Errno(rawValue: r)) }
    }
}
