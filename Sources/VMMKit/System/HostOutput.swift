import Glibc
import CKVM

/// Writes to a host file descriptor (UART output to the terminal).
enum HostOutput {
    static func write(fd: Int32, _ bytes: UnsafeRawBufferPointer) {
        guard var p = bytes.baseAddress else { return }
        var left = bytes.count
        while left > 0 {
            let n = Glibc.write(fd, p, left)
            if n < 0 { if ckvm_errno() == EINTR { continue }; return }
            if n == 0 { return }
            p += n
            left -= n
        }
    }
}
