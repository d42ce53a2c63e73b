/// Where a console device's output goes: a line-buffered byte sink, flushed
/// on newline, when full, and explicitly (the VM flushes at stop).
public final class OutputSink: @unchecked Sendable {
    private var buffer: [UInt8] = []
    private let capacity: Int
    private let output: (UnsafeRawBufferPointer) -> Void
    private let lock = ConditionLock()

    /// A sink that hands each flushed chunk to `output`.
    public init(capacity: Int = 4096, output: @escaping (UnsafeRawBufferPointer) -> Void) {
        self.capacity = max(1, capacity)
        self.output = output
        buffer.reserveCapacity(self.capacity)
    }

    /// A sink that writes to the process's standard output.
    public static func standardOutput() -> OutputSink {
        OutputSink { HostOutput.write(fd: 1, $0) }
    }

    /// A sink that writes to a host file descriptor.
    public static func fileDescriptor(_ fd: Int32) -> OutputSink {
        OutputSink { HostOutput.write(fd: fd, $0) }
    }

    /// Appends one byte; flushes on newline or when the buffer is full.
    @inline(__always)
    public func put(_ byte: UInt8) {
        lock.lock()
        buffer.append(byte)
        if byte == 0x0a || buffer.count >= capacity { flushLocked() }
        lock.unlock()
    }

    /// Writes out whatever is buffered.
    public func flush() {
        lock.lock()
        flushLocked()
        lock.unlock()
    }

    private func flushLocked() {
        guard !buffer.isEmpty else { return }
        buffer.withUnsafeBytes { output($0) }
        buffer.removeAll(keepingCapacity: true)
    }
}

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
