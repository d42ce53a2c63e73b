import CKVM
import Glibc

/// Reads guest image files from the host.
public enum ImageFile {
    /// Reads the whole file at `path` (at most ``ELFImage/maximumSize`` bytes).
    ///
    /// Only regular files are read: a FIFO, a device or a directory is refused
    /// before any read (a FIFO would otherwise block until a writer appears),
    /// and so is a file whose size is above the maximum (checked with `fstat`
    /// first, not after reading that much).
    ///
    /// - Throws: ``LoaderError/unreadable(path:errno:)`` when the file cannot be
    ///   opened or read, ``LoaderError/notRegularFile(path:)`` for anything but
    ///   a regular file, ``LoaderError/inconsistent(_:)`` when it is too large.
    public static func read(_ path: String) throws(LoaderError) -> [UInt8] {
        // O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw .unreadable(path: path, errno: Errno(rawValue: ckvm_errno())) }
        defer { _ = Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .unreadable(path: path, errno: Errno(rawValue: ckvm_errno())) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw .notRegularFile(path: path) }
        let limit = ELFImage.maximumSize
        guard st.st_size <= limit else { throw tooLarge(path, size: Int(st.st_size)) }
        var out: [UInt8] = []
        out.reserveCapacity(Int(st.st_size))
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if ckvm_errno() == EINTR { continue }
                throw .unreadable(path: path, errno: Errno(rawValue: ckvm_errno()))
            }
            if n == 0 { return out }
            out.append(contentsOf: buf[0..<n])
            // The file may grow while it is read.
            if out.count > limit { throw tooLarge(path, size: out.count) }
        }
    }

    private static func tooLarge(_ path: String, size: Int) -> LoaderError {
        .inconsistent("\(path) has \(size) bytes, more than the \(ELFImage.maximumSize) an image may have")
    }
}
