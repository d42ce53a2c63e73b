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
    /// `EINVAL`: invalid argument.
    public static let invalidArgument = Errno(rawValue: 22)
    /// `ENOSPC`: no space left.
    public static let noSpace = Errno(rawValue: 28)
    /// `ENOTTY`: inappropriate ioctl (the fd is not what the ioctl expects).
    public static let notTTY = Errno(rawValue: 25)
    /// `ENOSYS`: function not implemented.
    public static let notImplemented = Errno(rawValue: 38)
    /// `EOPNOTSUPP`: operation not supported.
    public static let notSupported = Errno(rawValue: 95)

    /// The symbolic name (`EINTR`, ...) when known, else `errno N`.
    public var name: String {
        switch rawValue {
        case 1: "EPERM"
        case 2: "ENOENT"
        case 4: "EINTR"
        case 5: "EIO"
        case 6: "ENXIO"
        case 7: "E2BIG"
        case 9: "EBADF"
        case 11: "EAGAIN"
        case 12: "ENOMEM"
        case 13: "EACCES"
        case 14: "EFAULT"
        case 16: "EBUSY"
        case 17: "EEXIST"
        case 19: "ENODEV"
        case 22: "EINVAL"
        case 25: "ENOTTY"
        case 28: "ENOSPC"
        case 38: "ENOSYS"
        case 95: "EOPNOTSUPP"
        default: "errno \(rawValue)"
        }
    }

    /// The symbolic name and number, e.g. `EINTR (4)`.
    public var description: String { "\(name) (\(rawValue))" }
}
