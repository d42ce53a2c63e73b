import Synchronization
import VMMKit

/// The end of a guest's output and how many bytes it wrote in all: what a benchmark run needs (the RESULT
/// line the guest prints last, the last lines for error messages), without holding the whole output of a
/// long run (a `uart-cpl3` run of ~5M iterations writes ~200 MB).
///
/// It keeps at least the last ``capacity`` bytes (at most twice that, trimmed in bulk so appends stay
/// amortized O(1)); ``text`` is the tail from its first whole line once older bytes were dropped.
final class OutputTail: Sendable {
    /// The bytes kept at least.
    let capacity: Int
    private let state: Mutex<(bytes: [UInt8], total: Int)>

    /// A tail keeping the last `capacity` bytes (64 KiB by default: a RESULT line is ~200 bytes).
    init(capacity: Int = 64 << 10) {
        self.capacity = max(1, capacity)
        state = Mutex(([], 0))
    }

    /// A sink that appends everything it flushes.
    func sink() -> OutputSink {
        OutputSink { [self] chunk in append(chunk) }
    }

    /// Appends bytes, dropping the oldest beyond twice the capacity.
    func append(_ chunk: UnsafeRawBufferPointer) {
        let keep = capacity
        state.withLock { s in
            s.total += chunk.count
            if chunk.count >= keep {
                s.bytes = Array(chunk[(chunk.count - keep)...])
                return
            }
            s.bytes.append(contentsOf: chunk)
            if s.bytes.count > 2 * keep { s.bytes.removeFirst(s.bytes.count - keep) }
        }
    }

    /// Counts `n` bytes written before the first appended one and never appended (a file read from its end).
    func countSkipped(_ n: Int) { state.withLock { $0.total += max(0, n) } }

    /// How many bytes were written in all.
    var byteCount: Int { state.withLock { $0.total } }

    /// The tail as UTF-8 text: every byte kept when nothing was dropped, otherwise from the first line that
    /// starts inside the kept bytes (a cut line never passes for a whole one).
    var text: String {
        state.withLock { s in
            var start = 0
            if s.total > s.bytes.count, let nl = s.bytes.firstIndex(of: 0x0a) { start = nl + 1 }
            return String(decoding: s.bytes[start...], as: UTF8.self)
        }
    }
}
