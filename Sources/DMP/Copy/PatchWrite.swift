/// One write into guest code: where, the bytes there before, and the bytes to put
/// there (the same length). Unpatching writes `original` back, and only where
/// `replacement` is still in place.
package struct PatchWrite: Hashable, Sendable {
    /// The guest-virtual address of the first byte.
    package var address: UInt64
    /// The bytes there now (restored by unpatching).
    package var original: [UInt8]
    /// The bytes to write.
    package var replacement: [UInt8]

    /// Creates a write.
    package init(address: UInt64, original: [UInt8], replacement: [UInt8]) {
        self.address = address; self.original = original; self.replacement = replacement
    }

    /// The bytes it changes.
    package var range: Range<UInt64> { address..<address &+ UInt64(replacement.count) }
}

/// Small x86-64 encodings the function copy needs: NOP fill and `jmp`/`call rel32`.
package enum CopyEncoding {
    /// The 5-byte NOP (`nop dword [rax+rax*1+0]`) the copy holds after calls and at loop heads.
    package static let nop5: [UInt8] = [0x0f, 0x1f, 0x44, 0x00, 0x00]

    /// NOP fill of `count` bytes: the recommended multi-byte NOPs (Intel SDM, `NOP`), longest first.
    package static func nops(_ count: Int) -> [UInt8] {
        let forms: [[UInt8]] = [
            [0x90], [0x66, 0x90], [0x0f, 0x1f, 0x00], [0x0f, 0x1f, 0x40, 0x00], nop5,
            [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00], [0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
            [0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00], [0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        ]
        var out: [UInt8] = []
        var left = max(0, count)
        while left > 0 {
            let n = min(left, forms.count)
            out += forms[n - 1]
            left -= n
        }
        return out
    }

    /// The rel32 from the end of an instruction at `address` of `length` bytes to `target`, or `nil` beyond ±2 GiB.
    package static func rel32(from address: UInt64, length: Int, to target: UInt64) -> Int32? {
        let next = address &+ UInt64(length)
        return Int32(exactly: Int64(bitPattern: target &- next))
    }

    /// `opcode rel32` (`E9` jmp, `E8` call) at `address` to `target`, or `nil` beyond ±2 GiB.
    package static func branch32(_ opcode: UInt8, at address: UInt64, to target: UInt64) -> [UInt8]? {
        guard let rel = rel32(from: address, length: 5, to: target) else { return nil }
        return [opcode] + le32(rel)
    }

    /// The little-endian bytes of a 32-bit value.
    package static func le32(_ v: Int32) -> [UInt8] {
        let u = UInt32(bitPattern: v)
        return [UInt8(u & 0xff), UInt8(u >> 8 & 0xff), UInt8(u >> 16 & 0xff), UInt8(u >> 24)]
    }
}
