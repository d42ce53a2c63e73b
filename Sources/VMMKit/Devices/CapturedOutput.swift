/// An in-memory sink target, for tests and for VMMs that inspect guest output.
public final class CapturedOutput: @unchecked Sendable {
    private var bytes: [UInt8] = []
    private let lock = ConditionLock()

    /// An empty capture.
    public init() {}

    /// A sink that appends everything it flushes to this capture.
    public func sink() -> OutputSink {
        OutputSink { [self] chunk in lock.withLock { bytes.append(contentsOf: chunk) } }
    }

    /// Everything captured so far.
    public var data: [UInt8] { lock.withLock { bytes } }
    /// Everything captured so far, as UTF-8 text.
    public var text: String { String(decoding: data, as: UTF8.self) }
}
