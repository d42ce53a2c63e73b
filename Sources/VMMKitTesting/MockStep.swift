import VMMKit

/// A step of a mock vCPU's script: what its next `KVM_RUN` does.
public enum MockStep: Sendable, CustomStringConvertible {
    /// Return this exit. `data` is the exit's data (port I/O elements, the MMIO/MSR value).
    case exit(VMExit, data: [UInt64] = [])
    /// Fail with this errno (`EINTR` is returned as ``VMExit/interrupted``, like KVM).
    case fail(Errno)
    /// Behave like a guest that never exits: block until kicked, then return ``VMExit/interrupted``
    /// (the step stays at the head of the script until a kick ends it).
    case spin
    /// The guest stores `size` bytes (1 to 8) of `value`, little-endian, at a
    /// guest-physical address, as KVM would run it: split at a page boundary
    /// into per-page fragments; a fragment in a page a writable slot backs is
    /// written to memory (and the script goes on without an exit); one in a
    /// read-only slot or in no slot exits as an MMIO write (RIP past the store,
    /// memory untouched), one exit per fragment.
    case guestStore(GuestAddress, size: Int, value: UInt64)
    /// Return this exit for an instruction of `length` bytes at the current RIP, and model where
    /// RIP is (the vCPU's ``MockVCPU/ripModel``): RIP stays on the instruction or moves past it at
    /// the exit; the run that completes the access moves it past and, for a read, writes the value
    /// supplied into its register: `destination` for MMIO loads, RAX for `in` and hypercalls,
    /// EDX:EAX for `rdmsr`.
    case access(VMExit, length: UInt8, destination: MockRegister = .rax, data: [UInt64] = [])
    /// A further exit of the instruction of the access before it (the next element of string
    /// I/O, the second half of a split MMIO access): the run that completes the previous part
    /// returns it, even with `immediate_exit` set, and RIP moves only when the last part completes.
    case continuation(VMExit, data: [UInt64] = [])
    /// The guest branches to this RIP without exiting (a loop's back-edge, so that the next scripted
    /// access exits from the same instruction again); the script goes on to the next step.
    case jump(to: UInt64)

    /// A short description.
    public var description: String {
        switch self {
        case .exit(let e, let d): d.isEmpty ? "exit \(e)" : "exit \(e) data \(d)"
        case .fail(let e): "fail \(e)"
        case .spin: "spin"
        case .guestStore(let a, let n, let v): "guest store \(n) bytes 0x\(String(v, radix: 16)) at \(a)"
        case .access(let e, let n, let r, let d): "access \(e) length \(n) into \(r)" + (d.isEmpty ? "" : " data \(d)")
        case .continuation(let e, let d): "continuation \(e)" + (d.isEmpty ? "" : " data \(d)")
        case .jump(let rip): "jump to 0x" + String(rip, radix: 16)
        }
    }
}
