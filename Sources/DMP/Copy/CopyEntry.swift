import VMMKit
import X86Disassembler

/// One way into a function copy (DESIGN.md, DMP step 4, "Entering the copy"): the
/// writes that make it, each changing one instruction of the running code, apart
/// from a `jmp rel32` put into provably dead padding.
package struct CopyEntry: Hashable, Sendable {
    /// How the entry leads into the copy.
    package enum Kind: String, Hashable, Sendable {
        /// The function's first instruction of at least 5 bytes (or the one after `endbr64`).
        case functionEntry = "entry instruction"
        /// Any instruction of at least 5 bytes inside the function (a loop's back-edge), redirected to the
        /// same point of the copy: same frame, same registers.
        case redirect = "instruction redirect"
        /// A direct `call rel32` elsewhere in the image, retargeted to the copy.
        case callSite = "call site"
        /// A direct `jmp rel32` (a tail call) elsewhere in the image, retargeted to the copy.
        case tailCallSite = "tail call site"
        /// A direct `call rel32` or `jmp rel32` inside another live function copy (the relocated form of a call
        /// site of the calling function), retargeted to the copy: implanted code, not the guest's.
        case liveCopyCallSite = "call site in a live copy"
        /// A 2–4-byte hot instruction turned into `jmp rel8` to a `jmp rel32` in dead padding.
        case deadPadding = "short jump through dead padding"
        /// A 2–4-byte entry instruction (or the one after `endbr64`) turned into `jmp rel8` to a `jmp rel32` in
        /// dead padding: the same tactic at the function's start, for functions reached only indirectly
        /// (function pointers) whose hot instruction is a single byte.
        case entryThroughPadding = "entry instruction through dead padding"
    }

    /// How it enters.
    package var kind: Kind
    /// The original instruction whose bytes change (the call site for call and tail-call sites).
    package var site: UInt64
    /// Where in the copy it leads.
    package var target: UInt64
    /// The writes, in the order to apply them: the padding's `jmp rel32` first, the instruction last.
    /// Each replaces one instruction's bytes only: the branch plus NOP padding to the instruction's length.
    package var writes: [PatchWrite]
    /// For ``Kind/deadPadding``: the padding bytes used (their page must be guarded too; never hand them out twice).
    package var deadPadding: Range<UInt64>?
}

extension FunctionCopy {
    /// Redirects the instruction at `original` (at least 5 bytes) to the same point of the copy:
    /// `jmp rel32` plus NOP padding to its length.
    package func redirect(at original: UInt64, kind: CopyEntry.Kind = .redirect) throws(DMPRefusal) -> CopyEntry {
        guard let k = function.index(at: original), let target = copyAddress(of: original) else {
            throw DMPRefusal(.plan, "0x\(String(original, radix: 16)) is not an instruction start of \(function.symbol.name)")
        }
        let i = function.instructions[k]
        guard i.length >= 5 else {
            throw DMPRefusal(.plan, "\(i) at \(function.location(original)) is \(i.length) bytes (a jmp rel32 needs 5)")
        }
        guard let jmp = CopyEncoding.branch32(at: original, to: target) else {
            throw DMPRefusal(.plan, "the copy is beyond ±2 GiB of \(function.location(original))")
        }
        let write = PatchWrite(address: original, original: i.bytes, replacement: jmp + CopyEncoding.nops(i.length - 5))
        return CopyEntry(kind: kind, site: original, target: target, writes: [write], deadPadding: nil)
    }

    /// The entry instruction: the function's first instruction if it has at least 5 bytes, or the one after
    /// a leading `endbr64` (which stays, so indirect calls still land on it).
    /// `pads`: ranges the guest rewrites itself (``CodeImage/pads(disassembler:)``): the entry instruction is the
    /// first one after them (a function's ftrace NOP runs on every call too, and the next instruction is on every
    /// call's path).
    package func functionEntry(pads: [Range<UInt64>] = []) throws(DMPRefusal) -> CopyEntry {
        let entry = try entryInstruction(pads: pads)
        guard entry.length >= 5 else {
            throw DMPRefusal(.plan, "the entry instruction of \(function.symbol.name) (\(entry)) is \(entry.length) bytes (a jmp rel32 needs 5)")
        }
        return try redirect(at: entry.address, kind: .functionEntry)
    }

    /// The function's first instruction, or the one after a leading `endbr64`, and after any instructions inside `pads`.
    private func entryInstruction(pads: [Range<UInt64>] = []) throws(DMPRefusal) -> X86Instruction {
        guard let first = function.instructions.first else { throw DMPRefusal(.plan, "\(function.symbol.name) is empty") }
        let endbr64: [UInt8] = [0xf3, 0x0f, 0x1e, 0xfa]
        var k = first.bytes == endbr64 && function.instructions.count > 1 ? 1 : 0
        while k + 1 < function.instructions.count, pads.contains(where: { $0.overlaps(function.instructions[k].address..<function.instructions[k].nextAddress) }) {
            k += 1
        }
        return function.instructions[k]
    }

    /// The entry instruction (or the one after `endbr64`) of 2 to 4 bytes turned into `jmp rel8` to a
    /// `jmp rel32` to the copy in provably dead padding, under the rules of
    /// ``deadPaddingEntry(hot:in:disassembler:avoiding:)``: a thread can only be at that instruction's start or
    /// end, as for a hot instruction, and the padding is never executed.
    package func entryThroughPadding(in image: CodeImage, disassembler: X86Disassembler,
                                     avoiding used: [Range<UInt64>] = []) throws(DMPRefusal) -> CopyEntry {
        try shortJump(at: try entryInstruction().address, kind: .entryThroughPadding, in: image, disassembler: disassembler, avoiding: used)
    }

    /// Redirects that lie on `hot`'s path, at most `limit`: the instructions of at least 5 bytes of the
    /// straight-line block around `hot` (before it back to the nearest branch target, nearest first, which run
    /// before every execution of `hot`; then after it up to the block's closing jump, which run after it), then
    /// the back-edge of the innermost loop holding `hot`, then, loop by loop outwards, the back-edge and the
    /// instructions of at least 5 bytes of every loop enclosing `hot` (nearest to `hot` first). Entering through
    /// one catches a hot loop in a function that never returns, at the same point of the copy (same frame, same
    /// registers): gcc's inner loops are often all short instructions (a 2-byte status poll, a 4-byte `add`),
    /// and then the way in is the next pass through an enclosing loop. Any instruction start of the function is
    /// a correct entry (the copy holds the same code at the same point); the order only decides which ones are
    /// likely to run soon.
    package func pathEntries(for hot: UInt64, limit: Int = 4) -> [CopyEntry] {
        let instructions = function.instructions
        guard let k = function.index(at: hot) else { return [] }
        let j = blockStart(k)
        var candidates: [X86Instruction] = Array(instructions[j...k].reversed())
        let transfers = Self.transfers
        var m = k
        while !transfers(instructions[m]), m + 1 < instructions.count {
            m += 1
            candidates.append(instructions[m])
        }
        let loops = loopsHolding(hot).map { ($0, $0.address &- ($0.branch?.target ?? $0.address)) }
        // Innermost loop first, then the loops enclosing it.
        for (back, _) in loops.sorted(by: { $0.1 < $1.1 }) {
            candidates.append(back)
            guard let head = back.branch?.target else { continue }
            func distance(_ i: X86Instruction) -> UInt64 { i.address < hot ? hot &- i.address : i.address &- hot }
            candidates += instructions.filter { $0.address >= head && $0.address <= back.address && $0.length >= 5 }
                .sorted { distance($0) < distance($1) }
        }
        var seen: Set<UInt64> = []
        var out: [CopyEntry] = []
        for i in candidates where i.length >= 5 && out.count < limit && seen.insert(i.address).inserted {
            if let e = try? redirect(at: i.address) { out.append(e) }
        }
        return out
    }

    /// Redirects before `hot`'s loops, at most `limit`: the instructions of at least 5 bytes of the straight run
    /// that falls into the outermost loop holding `hot` (or into `hot`'s block) from above, nearest first, back to
    /// the nearest jump or return. For a function whose loops hold only short instructions (gcc -Os and -O1: a
    /// 2-byte status poll, a 2-byte back-edge) and whose start offers no way in (a 2–4-byte first instruction, no
    /// padding, reached only through function pointers), the code before the loops (where the constants the
    /// loops keep in registers are loaded) is the way in on the function's next call. Correct for the same reason
    /// as ``pathEntries(for:limit:)``: any instruction start is.
    package func entriesBeforeLoops(for hot: UInt64, limit: Int = 2) -> [CopyEntry] {
        let instructions = function.instructions
        guard let k = function.index(at: hot) else { return [] }
        // The start of hot's block, or the outermost loop head above it.
        var p = blockStart(k)
        if let head = loopsHolding(hot).compactMap(\.branch?.target).min(), head < instructions[p].address,
           let h = function.index(at: head) { p = h }
        var out: [CopyEntry] = []
        while p > 0, !Self.transfers(instructions[p - 1]), out.count < limit {
            p -= 1
            if instructions[p].length >= 5, let e = try? redirect(at: instructions[p].address) { out.append(e) }
        }
        return out
    }

    /// Redirects in the function's entry block, at most `limit`, nearest its end first: the instructions of at
    /// least 5 bytes from the first instruction up to the first jump, return or branch target. They run on every
    /// call before anything else, so they lead to every hot instruction on the path the call takes, which a
    /// static reading cannot tell from the paths that never run (a delay loop behind a status test that always
    /// passes holds the only 5-byte instructions of the poll loop gcc laid out around it). Correct for the same
    /// reason as ``pathEntries(for:limit:)``: any instruction start is.
    package func entryBlockEntries(limit: Int = 2) -> [CopyEntry] {
        let instructions = function.instructions
        var targets: Set<UInt64> = []
        for i in instructions { if let b = i.branch, function.contains(b.target) { targets.insert(b.target) } }
        var end = 0
        while end < instructions.count, end == 0 || !targets.contains(instructions[end].address) {
            end += 1
            if Self.transfers(instructions[end - 1]) { break }
        }
        var out: [CopyEntry] = []
        for i in instructions[0..<end].reversed() where i.length >= 5 && out.count < limit {
            if let e = try? redirect(at: i.address) { out.append(e) }
        }
        return out
    }

    /// Whether the function goes back to its caller somewhere: a `ret`, or a jump that leaves it, a tail call (a
    /// direct `jmp` or `jcc` to an address outside it, or an indirect `jmp` that is not the dispatch of a jump table the
    /// copy keeps), after which the callee returns to this function's caller. A function that does neither never
    /// returns (a main loop): it is entered on its hot paths, where its thread is now. One that leaves only through a
    /// tail call (OpenBSD's `comcnputc` ends in gcc's `jmp splx`) returns like any other: each call starts it anew, so
    /// its start and its entry block lead to every hot instruction on the path that call takes.
    package var returnsToCaller: Bool {
        let tables = Set(jumpTables.map(\.jump))
        return function.instructions.contains { i in
            let g = i.groups
            if g.contains(.return) { return true }
            guard g.contains(.jump), !g.contains(.call) else { return false }
            guard let b = i.branch else { return !tables.contains(i.address) }
            return !function.contains(b.target)
        }
    }

    /// Whether `i` ends a straight run: a jump (taken or not) or a return.
    private static func transfers(_ i: X86Instruction) -> Bool { i.groups.contains(.jump) || i.groups.contains(.return) }

    /// The index of the first instruction of the straight-line block holding instruction `k`: back to a target
    /// of a branch inside the function or to the instruction after a jump or return.
    private func blockStart(_ k: Int) -> Int {
        let instructions = function.instructions
        var targets: Set<UInt64> = []
        for i in instructions { if let b = i.branch, function.contains(b.target) { targets.insert(b.target) } }
        var j = k
        while j > 0, !targets.contains(instructions[j].address), !Self.transfers(instructions[j - 1]) { j -= 1 }
        return j
    }

    /// The back-edges of the loops holding `hot`: relative branches (no calls) from at or after `hot` to at or before it.
    private func loopsHolding(_ hot: UInt64) -> [X86Instruction] {
        function.instructions.filter { i in
            guard let b = i.branch, !i.groups.contains(.call), function.contains(b.target) else { return false }
            return b.target <= hot && hot <= i.address
        }
    }

    /// Retargets a direct `call rel32` or `jmp rel32` (from ``CodeImage/callSites(to:disassembler:)``) that
    /// targets the function's start to the copy's start.
    package func callSiteEntry(_ site: X86Instruction) throws(DMPRefusal) -> CopyEntry {
        let opcode = site.bytes.first ?? 0
        guard site.length == 5, opcode == 0xe8 || opcode == 0xe9, site.branch?.target == function.start,
              let target = copyAddress(of: function.start) else {
            throw DMPRefusal(.plan, "\(site) at 0x\(String(site.address, radix: 16)) is not a direct call of \(function.symbol.name)")
        }
        guard let bytes = CopyEncoding.branch32(call: opcode == 0xe8, at: site.address, to: target) else {
            throw DMPRefusal(.plan, "the copy is beyond ±2 GiB of the call site at 0x\(String(site.address, radix: 16))")
        }
        return CopyEntry(kind: opcode == 0xe8 ? .callSite : .tailCallSite, site: site.address, target: target,
                         writes: [PatchWrite(address: site.address, original: site.bytes, replacement: bytes)], deadPadding: nil)
    }

    /// The direct `call rel32` and `jmp rel32` of the live copy `caller` (another function's copy, in the implant)
    /// that target this function's start, or `formerCopies` (the starts of earlier copies of this function, which
    /// a caller copied while one of them was entered through its call sites still names), retargeted to this
    /// copy's start: a function whose copy is made after its caller's is otherwise entered only by threads that
    /// still run the caller's original. Each is taken only where the caller's copy holds, at the copied call's
    /// place, exactly the 5-byte branch to that target (promoted calls are left alone).
    package func callSiteEntries(in caller: FunctionCopy, formerCopies: Set<UInt64> = []) -> [CopyEntry] {
        guard let target = copyAddress(of: function.start) else { return [] }
        var out: [CopyEntry] = []
        for f in caller.functions where f.start != function.start {
            for i in f.instructions where i.length == 5 {
                let opcode = i.bytes.first ?? 0
                guard let old = i.branch?.target, old == function.start || formerCopies.contains(old), old != target,
                      opcode == 0xe8 || opcode == 0xe9, let at = caller.copyAddress(of: i.address), at >= caller.address,
                      caller.bytes.count >= 5, at &- caller.address <= UInt64(caller.bytes.count - 5),
                      let expected = CopyEncoding.branch32(call: opcode == 0xe8, at: at, to: old),
                      Array(caller.bytes[Int(at &- caller.address)..<Int(at &- caller.address) + 5]) == expected,
                      let bytes = CopyEncoding.branch32(call: opcode == 0xe8, at: at, to: target) else { continue }
                out.append(CopyEntry(kind: .liveCopyCallSite, site: at, target: target,
                                     writes: [PatchWrite(address: at, original: expected, replacement: bytes)], deadPadding: nil))
            }
        }
        return out
    }

    /// Turns the 2–4-byte hot instruction at `hot` into `jmp rel8` to a `jmp rel32` (to the copy's point for
    /// `hot`) placed in provably dead padding within reach (the nearest first), only where DESIGN.md allows it: the padding lies
    /// between two symbols with nonzero sizes, holds only fill bytes (NOPs, `int3` or zeros), the instruction
    /// before it (the last of the symbol below, decoded whole) is `ret`, `jmp` or `ud2`, no symbol starts inside
    /// it and no code-address table (patchable entries, CFI) names it. `avoiding`: padding already used.
    package func deadPaddingEntry(hot: UInt64, in image: CodeImage, disassembler: X86Disassembler,
                                  avoiding used: [Range<UInt64>] = []) throws(DMPRefusal) -> CopyEntry {
        try shortJump(at: hot, kind: .deadPadding, in: image, disassembler: disassembler, avoiding: used)
    }

    /// `jmp rel8` at the 2–4-byte instruction at `hot` to a `jmp rel32` to its point in the copy, in dead padding.
    private func shortJump(at hot: UInt64, kind: CopyEntry.Kind, in image: CodeImage, disassembler: X86Disassembler,
                           avoiding used: [Range<UInt64>]) throws(DMPRefusal) -> CopyEntry {
        guard let k = function.index(at: hot), let target = copyAddress(of: hot) else {
            throw DMPRefusal(.plan, "0x\(String(hot, radix: 16)) is not an instruction start of \(function.symbol.name)")
        }
        let i = function.instructions[k]
        guard (2...4).contains(i.length) else {
            throw DMPRefusal(.plan, "\(i) at \(function.location(hot)) is \(i.length) bytes (a jmp rel8 entry takes 2 to 4)")
        }
        guard i.bytes != [0xf3, 0x0f, 0x1e, 0xfa] else {
            throw DMPRefusal(.plan, "endbr64 at \(function.location(hot)) stays (indirect branches must land on it)")
        }
        // Slot starts within rel8 of the jump's end, saturated at the ends of the address space.
        let next = hot &+ 2
        let low = next >= 128 ? next - 128 : 0
        let high = next > UInt64.max - 127 ? UInt64.max : next + 127
        let window = low..<(high > UInt64.max - 5 ? UInt64.max : high + 5)
        var reasons: [String] = []
        // The nearest padding first (after the function's end, usually: the same page, one guard fewer).
        let gaps = image.paddingGaps(overlapping: window).sorted { a, b in
            func distance(_ g: Range<UInt64>) -> UInt64 { g.lowerBound > hot ? g.lowerBound &- hot : hot &- g.upperBound }
            return distance(a) < distance(b)
        }
        for gap in gaps {
            if let why = image.deadness(of: gap, disassembler: disassembler) { reasons.append(why); continue }
            // The lowest 5-byte slot in reach that no other patch uses.
            var p = max(gap.lowerBound, low)
            while p <= gap.upperBound &- 5, p <= high { // gaps hold at least 5 bytes: no underflow
                let slot = p..<p &+ 5
                if !used.contains(where: { $0.overlaps(slot) }), let original = image.bytes(at: p, count: 5),
                   let jmp = CopyEncoding.branch32(at: p, to: target) {
                    let rel8 = UInt8(bitPattern: Int8(truncatingIfNeeded: Int64(bitPattern: p &- next)))
                    return CopyEntry(kind: kind, site: hot, target: target, writes: [
                        PatchWrite(address: p, original: original, replacement: jmp),
                        PatchWrite(address: hot, original: i.bytes, replacement: [0xeb, rel8] + CopyEncoding.nops(i.length - 2)),
                    ], deadPadding: slot)
                }
                if p == UInt64.max { break }
                p += 1
            }
            reasons.append("padding at 0x\(String(gap.lowerBound, radix: 16)) has no free 5-byte slot in reach")
        }
        throw DMPRefusal(.plan, "no dead padding within jmp rel8 reach of \(function.location(hot))"
                         + (reasons.isEmpty ? "" : " (" + reasons.joined(separator: "; ") + ")"))
    }
}

extension CodeImage {
    /// Gaps between consecutive symbols (no symbol covering or starting inside them) of at least 5 bytes that
    /// overlap `range`.
    package func paddingGaps(overlapping range: Range<UInt64>) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var coverEnd: UInt64?
        for s in symbols.symbols {
            if let c = coverEnd, s.address > c, s.address &- c >= 5 {
                let gap = c..<s.address
                if gap.overlaps(range) { out.append(gap) }
            }
            let end = s.address > UInt64.max - s.size ? UInt64.max : s.address + s.size
            coverEnd = max(coverEnd ?? end, end)
            if s.address > range.upperBound { break }
        }
        return out
    }

    /// Why `gap` is not provably dead padding, or `nil` when it is (see
    /// ``FunctionCopy/deadPaddingEntry(hot:in:disassembler:avoiding:)``).
    package func deadness(of gap: Range<UInt64>, disassembler: X86Disassembler) -> String? {
        let at = "padding at 0x\(String(gap.lowerBound, radix: 16))"
        let below = symbols.symbols.filter { $0.address &+ $0.size == gap.lowerBound }
        guard let a = below.first(where: { $0.size > 0 && $0.isFunction }) else { return "\(at): the symbol below it is not a sized function" }
        guard let b = symbols.symbols.first(where: { $0.address == gap.upperBound }), b.size > 0 else {
            return "\(at): the symbol above it has no size"
        }
        if b.name.hasPrefix("__cfi_") || b.name.hasPrefix("__pfx_") { return "\(at): \(b.name) (a CFI or patchable-entry preamble) covers it" }
        for t in tables where t.addresses.contains(where: { $0 >= gap.lowerBound && $0 <= gap.upperBound }) {
            return "\(at): named in \(t.name)"
        }
        let size = gap.upperBound &- gap.lowerBound
        guard size <= 4096, let fill = bytes(at: gap.lowerBound, count: Int(size)) else { return "\(at): bytes not in the image's code" }
        guard CodeImage.isFill(fill, at: gap.lowerBound, disassembler: disassembler) else { return "\(at): not all fill bytes" }
        guard let f = try? decode(a, disassembler: disassembler), let last = f.instructions.last else {
            return "\(at): \(a.name) below it does not decode whole"
        }
        let g = last.groups
        guard g.contains(.return) || g.contains(.undefined) || (g.contains(.jump) && !g.contains(.conditionalBranch)) else {
            return "\(at): \(a.name) can fall through into it (\(last))"
        }
        return nil
    }

    /// Whether `bytes` are alignment fill: all `int3`, all zeros, or NOPs (`90`, `0F 1F /0`, with `66`/`2E` prefixes) to the end.
    package static func isFill(_ bytes: [UInt8], at address: UInt64, disassembler: X86Disassembler) -> Bool {
        if bytes.allSatisfy({ $0 == 0xcc }) || bytes.allSatisfy({ $0 == 0 }) { return true }
        var offset = 0
        while offset < bytes.count {
            guard let i = try? disassembler.decode(Array(bytes[offset...].prefix(15)), address: address &+ UInt64(offset), mode: .bits64),
                  offset + i.length <= bytes.count else { return false }
            let e = i.encoding
            let nop = (e.map == .primary && e.opcode == 0x90 && (e.rex ?? 0) & 1 == 0 && !e.hasRep && !e.hasRepne)
                || (e.map == .map0F && e.opcode == 0x1f && (e.modRM >> 3) & 7 == 0)
            guard nop, e.legacyPrefixes.allSatisfy({ $0 == 0x66 || $0 == 0x2e }) else { return false }
            offset += i.length
        }
        return true
    }
}
