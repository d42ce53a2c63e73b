/// An in-memory sink target, for tests and for VMMs that inspect guest output.
///
/// The guest decides how much it writes: a capture keeps the first ``limit`` bytes and counts the rest
/// (``droppedByteCount``), so a guest that prints forever cannot exhaust the host's memory.
public final class CapturedOutput: @unchecked Sendable {
    private var bytes: [UInt8] = []
    private var dropped = 0
    private let lock = ConditionLock()

    /// The most bytes a capture keeps by default (64 MiB).
    public static let defaultLimit = 64 << 20

    /// The most bytes this capture keeps; later bytes are counted, not kept.
    public let limit: Int

    /// An empty capture that keeps at most `limit` bytes (at least 0).
    public init(limit: Int = CapturedOutput.defaultLimit) {
        self.limit = max(0, limit)
    }

    /// A sink that appends everything it flushes to this capture, up to ``limit`` bytes.
    public func sink() -> OutputSink {
        OutputSink { [self] chunk in
            lock.withLock {
                let room = max(0, limit - bytes.count)
                bytes.append(contentsOf: chunk.prefix(room))
                dropped &+= chunk.count - min(room, chunk.count)
            }
        }
    }

    /// Everything captured so far (at most ``limit`` bytes).
    public var data: [UInt8] { lock.withLock { bytes } }
    /// Everything captured so far, as UTF-8 text.
    public var text: String { String(decoding: data, as: UTF8.self) }
    /// The bytes written past ``limit``, which were not kept.
    public var droppedByteCount: Int { lock.withLock { dropped } }
}
