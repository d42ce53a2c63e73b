/// The few encodings the function copy writes outside a body, over ``X86Assembler``.
package enum CopyEncoding {
    /// The 5-byte NOP (`nop dword [rax+rax*1+0]`) the copy holds after calls and at loop heads.
    package static let nop5: [UInt8] = X86Assembler.nops[4]

    /// NOP fill of `count` bytes (the fewest recommended multi-byte NOPs).
    package static func nops(_ count: Int) -> [UInt8] {
        var a = X86Assembler(origin: 0)
        a.nop(count)
        return a.bytes
    }

    /// `jmp rel32` (or `call rel32`) at `address` to `target`, or `nil` beyond ±2 GiB.
    package static func branch32(call: Bool = false, at address: UInt64, to target: UInt64) -> [UInt8]? {
        var a = X86Assembler(origin: address)
        do throws(DMPRefusal) {
            if call { try a.call(.absolute(target)) } else { try a.jmp(.absolute(target)) }
            return try a.finish()
        } catch {
            return nil
        }
    }
}
