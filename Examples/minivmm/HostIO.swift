// minivmm's few libc calls: reading the image file and writing to stderr.
import ArgumentParser
import VMMKit
#if canImport(Glibc)
import Glibc
#endif

func printError(_ s: String) {
    var line = s
    if !line.hasSuffix("\n") { line += "\n" }
    var bytes = Array(line.utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress! + off, $0.count - off) }
        if n <= 0 { return }
        off += n
    }
    bytes.removeAll()
}

func parseSize(_ s: String) -> UInt64? {
    let t = s.uppercased().filter { $0 != " " }
    guard let last = t.last else { return nil }
    let mult: UInt64
    var num = t
    switch last {
    case "K": mult = 1 << 10; num.removeLast()
    case "M": mult = 1 << 20; num.removeLast()
    case "G": mult = 1 << 30; num.removeLast()
    default: mult = 1
    }
    guard let v = UInt64(num), v > 0 else { return nil }
    let (r, o) = v.multipliedReportingOverflow(by: mult)
    return o ? nil : r
}

func readFile(_ path: String) throws -> [UInt8] {
    guard let f = fopen(path, "rb") else {
        throw ValidationError("cannot open '\(path)': \(String(cString: strerror(errno)))")
    }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n > 0 { out.append(contentsOf: buf[0..<n]) }
        if n < buf.count { break }
        if out.count > ELFImage.maximumSize { throw ValidationError("'\(path)' is larger than \(ELFImage.maximumSize) bytes") }
    }
    return out
}
