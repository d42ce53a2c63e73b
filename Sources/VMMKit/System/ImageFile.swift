import CKVM
import Glibc

/// Reads guest image files from the host.
public enum ImageFile {
    /// Reads the whole file at `path` (at most ``ELFImage/maximumSize`` bytes).
    ///
    /// - Throws: ``LoaderError/unreadable(path:errno:)`` when the file cannot be
    ///   opened or read, ``LoaderError/inconsistent(_:)`` when it is too large.
    public static func read(_ path: String) throws(LoaderError) -> [UInt8] {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .unreadable(path: path, errno: Errno(rawValue: ckvm_errno())) }
        defer { _ = Glibc.close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if ckvm_errno() == EINTR { continue }
                throw .unreadable(path: path, errno: Errno(rawValue: ckvm_errno()))
            }
            if n == 0 { return out }
            out.append(contentsOf: buf[0..<n])
            if out.count > ELFImage.maximumSize { throw .inconsistent("\(path) is larger than \(ELFImage.maximumSize) bytes") }
        }
    }
}
