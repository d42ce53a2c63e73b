/// A JSON value, enough for `minivmm bench --json` (objects keep their key order).
enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    /// A finite number; NaN and infinities are written as `null`.
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    static func == (a: JSONValue, b: JSONValue) -> Bool { a.rendered() == b.rendered() }

    /// The value as JSON text; `indent` > 0 puts array elements and object members on lines of their own.
    func rendered(indent: Int = 0, level: Int = 0) -> String {
        let nl = indent > 0 ? "\n" + String(repeating: " ", count: indent * (level + 1)) : ""
        let close = indent > 0 ? "\n" + String(repeating: " ", count: indent * level) : ""
        switch self {
        case .null: return "null"
        case .bool(let v): return v ? "true" : "false"
        case .int(let v): return String(v)
        case .number(let v):
            guard v.isFinite else { return "null" }
            if v == v.rounded(), abs(v) < 1e15 { return String(Int(v)) }
            return String((v * 1000).rounded() / 1000)
        case .string(let s): return JSONValue.quoted(s)
        case .array(let a):
            if a.isEmpty { return "[]" }
            return "[" + a.map { nl + $0.rendered(indent: indent, level: level + 1) }.joined(separator: ",") + close + "]"
        case .object(let o):
            if o.isEmpty { return "{}" }
            let sep = indent > 0 ? ": " : ":"
            return "{" + o.map { nl + JSONValue.quoted($0.0) + sep + $0.1.rendered(indent: 0) }.joined(separator: ",") + close + "}"
        }
    }

    private static func quoted(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let h = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }
}
