/// Where a console device's output goes: a line-buffered byte sink, flushed
/// on newline, when full, and explicitly (the VM flushes at stop).
///
/// Safe from any thread. The host write (a terminal, a file) happens outside
/// the buffer's lock, so a device calling ``put(_:)`` never waits for the
/// terminal while another thread flushes; flushed chunks keep their order.
public final class OutputSink: @unchecked Sendable {
    /// Guarded by ``lock`` (no run-time exclusivity check: the lock does that).
    @exclusivity(unchecked) private var buffer: [UInt8] = []
    /// The buffer being written out (swapped with ``buffer`` under ``lock``).
    @exclusivity(unchecked) private var spare: [UInt8] = []
    private let capacity: Int
    private let output: (UnsafeRawBufferPointer) -> Void
    /// Guards ``buffer``; held only to append or swap, never across the host write.
    private let lock = SpinLock()
    /// Held across the host write: one flush at a time, in order.
    private let writerLock = ConditionLock()

    /// The largest buffer: 1 MiB (a chunk handed to the output is at most about twice this).
    public static let maximumCapacity = 1 << 20

    /// A sink that hands each flushed chunk to `output`.
    /// - Parameters:
    ///   - capacity: the bytes buffered before a flush: 1 to ``maximumCapacity`` (clamped to that range).
    ///   - output: called with each flushed chunk, one call at a time, in order.
    public init(capacity: Int = 4096, output: @escaping (UnsafeRawBufferPointer) -> Void) {
        self.capacity = min(max(1, capacity), OutputSink.maximumCapacity)
        self.output = output
        // Room for bytes that concurrent writers append while a flush runs.
        buffer.reserveCapacity(self.capacity * 2)
        spare.reserveCapacity(self.capacity * 2)
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
        let full = byte == 0x0a || buffer.count >= capacity
        lock.unlock()
        if full { flush() }
    }

    /// Appends bytes; flushes whenever the buffer fills and at the end when they held a newline.
    public func put(contentsOf bytes: UnsafeRawBufferPointer) {
        put(count: bytes.count) { bytes[$0] }
    }

    /// Appends the low byte of each value (a run of consumed ring entries), as
    /// ``put(contentsOf:)`` does.
    public func put(lowBytesOf values: UnsafeBufferPointer<UInt64>) {
        put(count: values.count) { UInt8(truncatingIfNeeded: values[$0]) }
    }

    /// Appends `count` bytes in chunks that fit the buffer, flushing (outside
    /// the buffer's lock) after each full chunk and after a newline.
    @inline(__always)
    private func put(count: Int, byte: (Int) -> UInt8) {
        var i = 0
        while i < count {
            lock.lock()
            var newline = false
            while i < count && buffer.count < capacity {
                let b = byte(i)
                buffer.append(b)
                newline = newline || b == 0x0a
                i += 1
            }
            let full = newline || buffer.count >= capacity
            lock.unlock()
            if full { flush() }
        }
    }

    /// Writes out whatever is buffered (outside the buffer's lock).
    public func flush() {
        writerLock.lock(); defer { writerLock.unlock() }
        lock.lock()
        swap(&buffer, &spare)
        lock.unlock()
        guard !spare.isEmpty else { return }
        spare.withUnsafeBytes { output($0) }
        spare.removeAll(keepingCapacity: true)
    }
}
