/// A symbol from an image's symbol table.
public struct GuestSymbol: Hashable, Sendable {
    /// The symbol's name.
    public var name: String
    /// Its address.
    public var address: UInt64
    /// Its size in bytes (0 when unknown).
    public var size: UInt64
    /// Whether it is a function (`STT_FUNC`).
    public var isFunction: Bool
    /// Creates a symbol.
    public init(name: String, address: UInt64, size: UInt64, isFunction: Bool) {
        self.name = name; self.address = address; self.size = size; self.isFunction = isFunction
    }
}

/// Symbols sorted by address, for turning guest addresses into `name+offset`.
public struct SymbolTable: Hashable, Sendable {
    /// The symbols, sorted by address.
    public let symbols: [GuestSymbol]

    /// Builds a table (sorts the symbols, drops unnamed ones).
    public init(_ symbols: [GuestSymbol] = []) {
        self.symbols = symbols.filter { !$0.name.isEmpty }.sorted { $0.address < $1.address }
    }

    /// The symbol containing `address` (or the nearest one below it when sizes are unknown).
    public func symbol(containing address: UInt64) -> GuestSymbol? {
        var lo = 0, hi = symbols.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if symbols[mid].address <= address { lo = mid + 1 } else { hi = mid }
        }
        var i = lo - 1
        while i >= 0 {
            let s = symbols[i]
            if s.size == 0 || address - s.address < s.size { return s }
            i -= 1
            if address - symbols[i + 1].address > 1 << 20 { break }
        }
        return nil
    }

    /// `name+0xoff` for `address`, or `nil` when no symbol covers it.
    public func symbolize(_ address: UInt64) -> String? {
        guard let s = symbol(containing: address) else { return nil }
        let off = address - s.address
        return off == 0 ? s.name : "\(s.name)+0x\(String(off, radix: 16))"
    }
}
