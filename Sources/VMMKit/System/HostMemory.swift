import Glibc
import CKVM

/// Anonymous host memory for guest RAM.
enum HostMemory {
    static func mapAnonymous(size: Int) -> Result<UnsafeMutableRawPointer, Errno> {
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              p != MAP_FAILED else {
            return .failure(Errno(rawValue: ckvm_errno()))
        }
        return .success(p)
    }

    static func unmap(_ p: UnsafeMutableRawPointer, size: Int) { _ = munmap(p, size) }
}
