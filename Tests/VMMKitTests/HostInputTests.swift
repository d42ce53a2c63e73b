import Testing
import VMMKit
#if canImport(Glibc)
import Glibc
#endif

/// A fresh temporary directory, removed with its files by `body`'s end.
func withTemporaryDirectory<R>(_ body: (String) throws -> R) throws -> R {
    var template = Array("/tmp/vmmkit-test-XXXXXX".utf8CString)
    guard let p = mkdtemp(&template) else { throw Errno(rawValue: errno) }
    let dir = String(cString: p)
    defer {
        if let d = opendir(dir) {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != "." && name != ".." { unlink(dir + "/" + name) }
            }
            closedir(d)
        }
        rmdir(dir)
    }
    return try body(dir)
}

/// Creates the file at `path` with `bytes`, then extends it (sparse) to `size` bytes when given.
func createFile(_ path: String, bytes: [UInt8] = [], size: Int? = nil) throws {
    let fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0o600)
    guard fd >= 0 else { throw Errno(rawValue: errno) }
    defer { close(fd) }
    guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else { throw Errno(rawValue: errno) }
    if let size, ftruncate(fd, off_t(size)) != 0 { throw Errno(rawValue: errno) }
}

@Suite("Host input: image files, errno names, access advice")
struct HostInputTests {
    @Test("a FIFO is refused at once, not read (which would wait for a writer forever)")
    func fifo() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/fifo"
            try #require(mkfifo(path, 0o600) == 0)
            #expect(throws: LoaderError.notRegularFile(path: path)) { _ = try ImageFile.read(path) }
        }
    }

    @Test("a directory and a character device are not images")
    func notRegular() {
        #expect(throws: LoaderError.notRegularFile(path: "/")) { _ = try ImageFile.read("/") }
        #expect(throws: LoaderError.notRegularFile(path: "/dev/null")) { _ = try ImageFile.read("/dev/null") }
    }

    @Test("a file above the size limit is refused from its size, before anything is read")
    func tooLarge() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/big"
            // Sparse: 10 GiB that take no disk space. Reading 1 GiB of it first would take seconds and 1 GiB of RAM.
            try createFile(path, size: 10 << 30)
            #expect {
                _ = try ImageFile.read(path)
            } throws: { e in
                guard case LoaderError.inconsistent(let s) = e else { return false }
                return s.contains("10737418240 bytes")
            }
        }
    }

    @Test("a small regular file is read whole")
    func smallFile() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/img"
            let bytes: [UInt8] = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            try createFile(path, bytes: bytes)
            #expect(try ImageFile.read(path) == bytes)
        }
    }

    @Test("errno values are named like ENOENT and EACCES, including EISDIR; unknown ones by number", arguments: [
        (2, "ENOENT"), (13, "EACCES"), (21, "EISDIR"), (20, "ENOTDIR"), (24, "EMFILE"), (110, "ETIMEDOUT"), (9999, "errno 9999"),
    ])
    func errnoNames(value: Int32, name: String) {
        #expect(Errno(rawValue: value).name == name)
    }

    @Test("permission advice names the device's group only when it has one that exists")
    func accessAdvice() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/kvm"
            try createFile(path)
            try #require(chown(path, getuid(), 0) == 0)
            let rootOwned = BackendError("open " + path, errno: .permissionDenied).description
            #expect(rootOwned.contains("belongs to no group"), "\(rootOwned)")
            #expect(!rootOwned.contains("'kvm'"))
            // A group that exists here (the tests run as root, so chown works).
            guard let g = getgrnam("daemon") ?? getgrnam("users") else { return }
            let name = String(cString: g.pointee.gr_name)
            try #require(chown(path, getuid(), g.pointee.gr_gid) == 0)
            let grouped = BackendError("open " + path, errno: .permissionDenied).description
            #expect(grouped.contains("add this user to the '\(name)' group"), "\(grouped)")
        }
    }
}
