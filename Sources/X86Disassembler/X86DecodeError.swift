import VMMKit

/// Why an instruction could not be decoded.
public enum X86DecodeError: Error, Hashable, Sendable, CustomStringConvertible {
    /// No bytes were given.
    case empty
    /// The bytes end before the instruction does (`needed` is a lower bound).
    case truncated(available: Int, needed: Int)
    /// The bytes are not a valid instruction in this mode.
    case invalid
    /// The encoding is longer than 15 bytes.
    case tooLong
    /// A `66`-prefixed near `call`/`jmp`/`jcc` in 64-bit mode: its length depends on the CPU vendor
    /// (Intel ignores the prefix and reads rel32, AMD reads rel16; Capstone 4.0.2 decodes AMD's form).
    case vendorDependentBranch
    /// Capstone and VMMKit's encoding tables disagree about the length (an unknown Capstone mistake or a table gap).
    case lengthDisagreement(capstone: Int, tables: Int)
    /// Capstone could not be opened (`cs_open` failed with this `cs_err`).
    case capstoneUnavailable(Int)
    /// The vCPU is in compatibility mode (long mode with a 32- or 16-bit code segment): not decoded.
    case compatibilityMode
    /// The code cannot be fetched: the first byte's page walk or read failed.
    case fetch(virtual: UInt64, GuestMemoryError)
    /// The instruction runs into a page whose walk or read failed, after `available` bytes.
    case codeEndsAt(virtual: UInt64, available: Int, GuestMemoryError)

    /// A one-line description.
    public var description: String {
        switch self {
        case .empty: "no bytes to decode"
        case .truncated(let a, let n): "the instruction needs at least \(n) bytes, \(a) available"
        case .invalid: "not a valid instruction"
        case .tooLong: "encoding longer than 15 bytes"
        case .vendorDependentBranch: "66-prefixed near branch in 64-bit mode (length depends on the CPU vendor)"
        case .lengthDisagreement(let c, let t): "Capstone decodes \(c) bytes, the encoding tables \(t)"
        case .capstoneUnavailable(let e): "cs_open failed (cs_err \(e))"
        case .compatibilityMode: "compatibility-mode code is not decoded"
        case .fetch(let v, let e): "cannot fetch code at 0x\(String(v, radix: 16)): \(e)"
        case .codeEndsAt(let v, let a, let e): "code ends at 0x\(String(v, radix: 16)) after \(a) bytes: \(e)"
        }
    }
}
