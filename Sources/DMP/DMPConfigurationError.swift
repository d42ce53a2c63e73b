/// A ``DMPConfiguration`` setting outside its allowed range, found by ``DMPConfiguration/validate()``: the field,
/// the value and the range it must lie in.
public enum DMPConfigurationError: Error, Hashable, Sendable, CustomStringConvertible {
    /// An integer setting outside `allowed`.
    case integerOutOfRange(field: String, value: Int, allowed: ClosedRange<Int>)
    /// A floating-point setting outside `allowed`, NaN or infinite.
    case numberOutOfRange(field: String, value: Double, allowed: ClosedRange<Double>)

    /// The name of the setting (a ``DMPConfiguration`` property, such as `"verifyWindowSeconds"`).
    public var field: String {
        switch self {
        case .integerOutOfRange(let field, _, _), .numberOutOfRange(let field, _, _): field
        }
    }

    /// `DMPConfiguration.window is -5; allowed: 1 to 16777216`.
    public var description: String {
        switch self {
        case .integerOutOfRange(let field, let value, let allowed):
            let range = allowed.upperBound == .max ? "at least \(allowed.lowerBound)" : "\(allowed.lowerBound) to \(allowed.upperBound)"
            return "DMPConfiguration.\(field) is \(value); allowed: \(range)"
        case .numberOutOfRange(let field, let value, let allowed):
            return "DMPConfiguration.\(field) is \(value); allowed: a finite number from \(allowed.lowerBound) to \(allowed.upperBound)"
        }
    }
}
