/// A vCPU found paused inside bytes a write would change (``Patcher``): strictly inside the instruction, or at
/// the first byte of a `jmp rel32` in dead padding (``CodeWrite/guardsItsStart``), where it would resume in the
/// middle of the new bytes or in restored fill bytes.
package struct VCPUInside: Equatable, Sendable, CustomStringConvertible {
    /// The vCPU's id.
    package var vcpu: Int
    /// Its RIP when paused.
    package var rip: UInt64
    /// The guest-virtual start of the instruction the write would change.
    package var instruction: UInt64

    /// Creates the record.
    package init(vcpu: Int, rip: UInt64, instruction: UInt64) {
        self.vcpu = vcpu; self.rip = rip; self.instruction = instruction
    }

    /// `vCPU N is inside the instruction at 0x…` (`at its first byte` for a padding `jmp` whose start it is on).
    package var description: String {
        "vCPU \(vcpu) is inside the instruction at \(hex(instruction))" + (rip == instruction ? " (at its first byte)" : "")
    }
}
