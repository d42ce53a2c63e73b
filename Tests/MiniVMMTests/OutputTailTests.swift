import Testing
@testable import minivmm

/// `lines` lines of guest chatter (each a few dozen bytes), then a RESULT line, as a uart workload prints them.
private func guestOutput(lines: Int) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(lines * 40 + 200)
    for i in 0..<lines { out += Array("line \(i): the quick brown fox jumps over\n".utf8) }
    out += Array("RESULT workload=uart-cpl3 iters=5000000 warmup=500 cycles_per_iter=826.5 checksum=0x1472f3a9\n".utf8)
    return out
}

/// Feeds `bytes` to `tail` in chunks of `chunk` bytes, as an output sink flushes them.
private func feed(_ bytes: [UInt8], to tail: OutputTail, chunk: Int = 4096) {
    var i = 0
    bytes.withUnsafeBytes { all in
        while i < all.count {
            let n = min(chunk, all.count - i)
            tail.append(UnsafeRawBufferPointer(rebasing: all[i..<(i + n)]))
            i += n
        }
    }
}

@Suite("minivmm bench keeps only the end of a run's output")
struct OutputTailTests {
    @Test("a run's RESULT parses the same from the tail as from the whole output; the tail stays bounded; the byte count is exact",
          arguments: [1 << 10, 64 << 10])
    func resultFromTail(capacity: Int) throws {
        let whole = guestOutput(lines: 200_000)   // ~9 MB
        let tail = OutputTail(capacity: capacity)
        feed(whole, to: tail)
        #expect(tail.byteCount == whole.count)
        #expect(tail.text.utf8.count <= 2 * capacity, "kept \(tail.text.utf8.count) bytes")
        let a = try BenchRun(result: String(decoding: whole, as: UTF8.self), "whole")
        let b = try BenchRun(result: tail.text, "tail")
        #expect(a.iterations == b.iterations && a.steadyIterations == b.steadyIterations)
        #expect(a.cyclesPerIteration == b.cyclesPerIteration && a.checksum == b.checksum)
        #expect(b.iterations == 5_000_000 && b.steadyIterations == 4_999_500 && b.checksum == "0x1472f3a9")
        // The last lines are there for error messages, and the text starts at a line's start.
        #expect(tail.text.hasSuffix("checksum=0x1472f3a9\n"))
        #expect(tail.text.hasPrefix("line "))
    }

    @Test("short output is kept whole; a chunk larger than the capacity keeps its end")
    func shortAndHuge() {
        let t = OutputTail(capacity: 16)
        feed(Array("Hello from the VMMKit demo\n".utf8).prefix(10).map { $0 }, to: t)
        #expect(t.text == "Hello from" && t.byteCount == 10)
        let big = OutputTail(capacity: 16)
        feed(Array("0123456789abcdef0123456789\nRESULT x=1\n".utf8), to: big, chunk: 1 << 20)
        #expect(big.text == "RESULT x=1\n", "the cut line before it is dropped")
        #expect(big.byteCount == 38)
    }

    @Test("a line cut at the tail's start never passes for a RESULT line")
    func cutLine() {
        let t = OutputTail(capacity: 12)
        feed(Array("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxRESULT iters=1 warmup=0 cycles_per_iter=1 checksum=0x0\nok\n".utf8), to: t, chunk: 5)
        #expect(t.text == "ok\n")
        #expect(lastResultLine(t.text) == nil)
    }

    @Test("spawn keeps the end of a process's output, not all of it")
    func spawnTail() throws {
        let script = "head -c 3000000 /dev/zero | tr '\\0' 'a'; echo; echo 'RESULT iters=10 warmup=1 cycles_per_iter=5 checksum=0x00000001'"
        let r = try spawn(["/bin/sh", "-c", script], tail: 4096)
        #expect(r.status == 0)
        #expect(r.output.utf8.count <= 2 * 4096)
        #expect(r.output.hasPrefix("RESULT"), "the 3 MB line before it is cut, so dropped")
        let run = try BenchRun(result: r.output, "sh")
        #expect(run.iterations == 10 && run.steadyIterations == 9 && run.checksum == "0x00000001")
    }
}
