/// A failed hypervisor operation: which ioctl (or system call) failed and with
/// which `errno`.
public struct BackendError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The operation that failed, named after the ioctl (`KVM_RUN`,
    /// `KVM_SET_USER_MEMORY_REGION`, ...) or system call (`open /dev/kvm`, `mmap`).
    public var operation: String
    /// The `errno` the operation failed with.
    public var errno: Errno
    /// An optional detail (for example the path that could not be opened).
    public var detail: String?

    /// Creates an error for `operation` failing with `errno`.
    public init(_ operation: String, errno: Errno, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    /// What kind of failure this is, for callers that branch on it.
    public var kind: Kind {
        switch errno {
        case .interrupted: .interrupted
        case .tryAgain: .tryAgain
        case .badAddress: .badAddress
        case .outOfMemory, .noSpace: .outOfMemory
        case .noSuchFile, .noDevice, .noSuchDevice: .unavailable
        case .permissionDenied, .notPermitted: .permissionDenied
        case .invalidArgument, .tooBig, .exists: .invalidArgument
        case .notTTY, .notImplemented, .notSupported: .unsupported
        default: .other
        }
    }

    /// The broad classes of backend failure.
    public enum Kind: Sendable, Hashable {
        /// `EINTR`: interrupted by a signal or `immediate_exit`; not a failure for `KVM_RUN`.
        case interrupted
        /// `EAGAIN`: a transient condition; the caller may try again.
        case tryAgain
        /// `EFAULT`: the kernel could not access memory it was given.
        case badAddress
        /// `ENOMEM`/`ENOSPC`: out of memory or another resource.
        case outOfMemory
        /// The hypervisor device does not exist.
        case unavailable
        /// The hypervisor device exists but this process may not use it.
        case permissionDenied
        /// The kernel rejected an argument.
        case invalidArgument
        /// The kernel does not support the operation.
        case unsupported
        /// Any other `errno`.
        case other
    }

    /// A one-line description naming the operation and errno.
    public var description: String {
        var s = "\(operation) failed: \(errno)"
        if let detail { s += " (\(detail))" }
        switch kind {
        case .unavailable where operation.hasPrefix("open"):
            s += "; is the kvm module loaded? (/dev/kvm is missing)"
        case .permissionDenied where operation.hasPrefix("open "):
            s += "; " + BackendError.accessAdvice(path: String(operation.dropFirst(5)))
        default: break
        }
        return s
    }

    /// What to do about a device this user may not open: join the group that
    /// owns it, when it belongs to one (not root's) that exists here; else run
    /// as root or get access to it another way.
    static func accessAdvice(path: String) -> String {
        if let group = Sys.owningGroup(of: path) {
            return "add this user to the '\(group)' group that owns \(path) (sudo usermod -aG \(group) $USER, then log in again) or run as root"
        }
        return "\(path) belongs to no group this user could join: run as root or grant this user read and write access to it"
    }
}
