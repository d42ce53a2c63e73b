/// Why a guest image could not be loaded.
public enum LoaderError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The image is empty.
    case empty
    /// The image file could not be opened or read.
    case unreadable(path: String, errno: Errno)
    /// The path names something other than a regular file (a directory, FIFO, socket or device).
    case notRegularFile(path: String)
    /// The image ends before a structure it declares: `what` needs bytes up to `needed`, the image has `available`.
    case truncated(what: String, needed: UInt64, available: UInt64)
    /// Not an ELF file (bad magic), or not what the loader expects.
    case badMagic
    /// Not a 64-bit little-endian ELF.
    case unsupportedFormat(String)
    /// An ELF for another machine (`e_machine`).
    case unsupportedMachine(UInt16)
    /// A header field has a value that cannot be right (sizes, counts).
    case inconsistent(String)
    /// A segment lies (partly) outside guest RAM or in memory the platform reserves.
    case segmentOutsideMemory(index: Int, address: UInt64, size: UInt64)
    /// Two loadable segments overlap.
    case overlappingSegments(Int, Int)
    /// The image has no loadable segment.
    case noLoadableSegments
    /// The entry point is not inside a loaded segment.
    case entryOutsideImage(UInt64)
    /// The command line does not fit the space reserved for it.
    case commandLineTooLong(length: Int, maximum: Int)
    /// The guest memory is too small for the platform layout.
    case memoryTooSmall(needed: UInt64, available: UInt64)
    /// The image cannot run where it is linked without relocation processing, which the loader does not do: a
    /// position-independent executable (`ET_DYN`) linked at address 0, an image that asks for a dynamic linker
    /// (`PT_INTERP`), or dynamic relocations that would change a byte at the link address (symbolic ones, or a
    /// `R_X86_64_RELATIVE` whose field does not already hold its value). The string says which and where.
    case relocationRequired(String)

    /// A one-line description.
    public var description: String {
        func h(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .empty: return "the image is empty"
        case .unreadable(let p, let e): return "cannot read \(p): \(e)"
        case .notRegularFile(let p): return "\(p) is not a regular file"
        case .truncated(let w, let n, let a): return "truncated image: \(w) needs \(n) bytes, the file has \(a)"
        case .badMagic: return "not an ELF image (bad magic)"
        case .unsupportedFormat(let s): return "unsupported ELF: \(s)"
        case .unsupportedMachine(let m): return "ELF for machine \(m), expected x86-64 (62)"
        case .inconsistent(let s): return "inconsistent image: \(s)"
        case .segmentOutsideMemory(let i, let a, let s):
            return "segment \(i) at \(h(a)) (+\(h(s))) lies outside guest RAM or in reserved memory"
        case .overlappingSegments(let a, let b): return "segments \(a) and \(b) overlap"
        case .noLoadableSegments: return "no loadable segment"
        case .entryOutsideImage(let e): return "entry point \(h(e)) is outside the loaded segments"
        case .commandLineTooLong(let l, let m): return "command line of \(l) bytes exceeds \(m)"
        case .memoryTooSmall(let n, let a): return "guest memory of \(a) bytes is below the \(n) the platform needs"
        case .relocationRequired(let s):
            return "the image needs relocation processing, which the loader does not do (it loads images at their link addresses): \(s)"
        }
    }
}
