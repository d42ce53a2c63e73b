/// Errors from setting up the paravirtual rings. Guest-written ring words
/// never cause one: the consumer treats any value as data to skip or wait for.
public enum PVRingError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The ring's memory is not backed by guest memory.
    case memory(GuestMemoryError)
    /// The ring layout does not fit in the paravirtual area, or a target is malformed.
    case layout(String)

    /// A one-line description.
    public var description: String {
        switch self {
        case .memory(let e): "paravirtual ring memory: \(e)"
        case .layout(let s): "paravirtual ring layout: \(s)"
        }
    }
}
