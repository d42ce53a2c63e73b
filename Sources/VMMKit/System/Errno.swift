import CKVM

/// An `errno` value returned by a system call, with names for the values a
/// VMM meets most often.
public struct Errno: RawRepresentable, Error, Hashable, Sendable, CustomStringConvertible {
    /// The raw `errno` value.
    public var rawValue: Int32
    /// Wraps a raw `errno` value.
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// `EPERM`: operation not permitted.
    public static let notPermitted = Errno(rawValue: 1)
    /// `ENOENT`: no such file or directory.
    public static let noSuchFile = Errno(rawValue: 2)
    /// `EINTR`: interrupted by a signal (for `KVM_RUN`: a kick or `immediate_exit`).
    public static let interrupted = Errno(rawValue: 4)
    /// `EIO`: input/output error.
    public static let ioError = Errno(rawValue: 5)
    /// `ENXIO`: no such device or address.
    public static let noSuchDevice = Errno(rawValue: 6)
    /// `E2BIG`: argument list too long (for KVM: a buffer too small).
    public static let tooBig = Errno(rawValue: 7)
    /// `EBADF`: bad file descriptor.
    public static let badFileDescriptor = Errno(rawValue: 9)
    /// `EAGAIN`: try again.
    public static let tryAgain = Errno(rawValue: 11)
    /// `ENOMEM`: out of memory.
    public static let outOfMemory = Errno(rawValue: 12)
    /// `EACCES`: permission denied.
    public static let permissionDenied = Errno(rawValue: 13)
    /// `EFAULT`: bad address.
    public static let badAddress = Errno(rawValue: 14)
    /// `EBUSY`: device or resource busy.
    public static let busy = Errno(rawValue: 16)
    /// `EEXIST`: already exists.
    public static let exists = Errno(rawValue: 17)
    /// `ENODEV`: no such device.
    public static let noDevice = Errno(rawValue: 19)
    /// `ENOTDIR`: not a directory.
    public static let notDirectory = Errno(rawValue: 20)
    /// `EISDIR`: is a directory.
    public static let isDirectory = Errno(rawValue: 21)
    /// `EINVAL`: invalid argument.
    public static let invalidArgument = Errno(rawValue: 22)
    /// `EMFILE`: too many open files in this process.
    public static let tooManyOpenFiles = Errno(rawValue: 24)
    /// `ENOSPC`: no space left.
    public static let noSpace = Errno(rawValue: 28)
    /// `ENOTTY`: inappropriate ioctl (the fd is not what the ioctl expects).
    public static let notTTY = Errno(rawValue: 25)
    /// `ENOSYS`: function not implemented.
    public static let notImplemented = Errno(rawValue: 38)
    /// `EOPNOTSUPP`: operation not supported.
    public static let notSupported = Errno(rawValue: 95)

    /// The symbolic name (`EINTR`, `EISDIR`, ...) of every errno the C library
    /// knows (`strerrorname_np`), else `errno N`.
    public var name: String {
        guard let p = ckvm_errno_name(rawValue) else { return "errno \(rawValue)" }
        return String(cString: p)
    }

    /// The symbolic name and number, e.g. `EINTR (4)`.
    public var description: String { "\(name) (\(rawValue))" }
}
