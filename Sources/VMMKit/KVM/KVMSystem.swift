import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The KVM hypervisor: an open `/dev/kvm` (the system file descriptor).
///
/// ```swift
/// let kvm = try KVMSystem()          // opens /dev/kvm
/// let vm = try VirtualMachine(backend: kvm, configuration: .init())
/// ```
public final class KVMSystem: HypervisorBackend, @unchecked Sendable {
    /// The `/dev/kvm` file descriptor.
    public let fd: Int32
    /// The size of each vCPU's `kvm_run` mapping. The corresponding ioctl is `KVM_GET_VCPU_MMAP_SIZE`.
    public let vcpuMmapSize: Int
    /// `"kvm"`.
    public var name: String { "kvm" }

    /// Opens the KVM device and checks its API version (12).
    ///
    /// - Throws: ``BackendError`` naming `open /dev/kvm` (missing device,
    ///   permission denied) or the failed ioctl.
    public init(path: String = "/dev/kvm") throws(BackendError) {
        let fd = try Sys.open(path, flags: O_RDWR)
        do throws(BackendError) {
            let version = try Sys.ioctl(fd, CKVM_GET_API_VERSION, "KVM_GET_API_VERSION")
            guard version == KVM_API_VERSION else {
                throw BackendError("KVM_GET_API_VERSION", errno: .notSupported, detail: "API version \(version), expected \(KVM_API_VERSION)")
            }
            let size = try Sys.ioctl(fd, CKVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE")
            guard size >= Int32(ckvm_run_size()) else {
                throw BackendError("KVM_GET_VCPU_MMAP_SIZE", errno: .invalidArgument, detail: "size \(size) too small")
            }
            self.vcpuMmapSize = Int(size)
        } catch {
            Sys.close(fd)
            throw error
        }
        self.fd = fd
    }

    deinit { Sys.close(fd) }

    /// Whether `/dev/kvm` can be opened here; `nil` if it can, else the reason.
    public static func unavailableReason(path: String = "/dev/kvm") -> String? {
        do {
            _ = try KVMSystem(path: path)
            return nil
        } catch {
            return error.description
        }
    }

    /// The value of a capability (0 when absent). The corresponding ioctl is `KVM_CHECK_EXTENSION`.
    public func checkExtension(_ capability: Int32) -> Int32 {
        (try? Sys.ioctl(fd, CKVM_CHECK_EXTENSION, value: UInt(capability), "KVM_CHECK_EXTENSION")) ?? 0
    }

    /// Creates a VM. The corresponding ioctl is `KVM_CREATE_VM`.
    public func createVM() throws(BackendError) -> any VMBackend {
        try KVMVM(system: self)
    }

    /// The CPUID leaves KVM supports. The corresponding ioctl is `KVM_GET_SUPPORTED_CPUID`.
    public func supportedCPUID() throws(BackendError) -> [CPUIDEntry] {
        var capacity = 64
        while true {
            let cap = capacity
            let result: [CPUIDEntry]? = try withKVMFlexibleArray(kvm_cpuid2.self, kvm_cpuid_entry2.self, count: cap) {
                (buf, entries) throws(BackendError) -> [CPUIDEntry]? in
                buf.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(cap)
                do throws(BackendError) {
                    _ = try Sys.ioctl(fd, CKVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
                } catch where error.errno == .tooBig && cap < 4096 {
                    return nil // more leaves than room: try again with more
                }
                let n = Int(buf.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent)
                return (0..<min(n, cap)).map { i in
                    let e = entries[i]
                    return CPUIDEntry(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
                }
            }
            if let result { return result }
            capacity *= 2
        }
    }
}
