import VMMKit

/// Function copies and the copies already live: calls between them go copy to copy
/// (Documentation/DMP.md, "Entering the copy").
extension PatchPlanner {
    /// The calls of `copy`'s function inside the function copies of `others` (the live patches a plan does not
    /// replace), as entries: each call's copy must translate, under `paging`, to where its patch wrote it.
    func liveCopyCallSites(of copy: FunctionCopy, others: [AppliedPatch], paging: PagingContext) -> [CopyEntry] {
        let former = Set(copyStarts.filter { $0.value == copy.function.start }.map(\.key))
        var out: [CopyEntry] = []
        for p in others {
            guard let caller = p.copy else { continue }
            let offset = p.codeVirtualStart &- p.implantCode.start.rawValue
            for e in copy.callSiteEntries(in: caller, formerCopies: former) {
                guard let t = try? vm.memory.translate(e.site, paging: paging, access: [.execute]),
                      t.physical.rawValue == e.site &- offset else { continue }
                out.append(e)
            }
        }
        return out
    }

    /// The bytes at a call site in a live copy (`write`) when they are not the relocated original call: a direct
    /// branch of the same kind to an earlier or live copy of the function starting at `start` (the caller's copy
    /// was made calling it), which the entry replaces; `nil` when they are the original (or anything else, which
    /// the patcher then refuses as changed code).
    func currentCall(at write: CodeWrite, of start: UInt64) -> [UInt8]? {
        guard let now = try? vm.memory.readBytes(at: write.physical, count: write.original.count), now != write.original,
              now.count == 5, now.first == write.original.first else { return nil }
        let rel = Int32(bitPattern: UInt32(now[1]) | UInt32(now[2]) << 8 | UInt32(now[3]) << 16 | UInt32(now[4]) << 24)
        let target = write.virtual &+ 5 &+ UInt64(bitPattern: Int64(rel))
        return copyStarts[target] == start ? now : nil
    }

    /// The implanted bytes of `copy`: its direct calls of functions that have live copies (of `others`, the live
    /// patches the plan does not replace) go to those copies, as the calls of its original that their patches
    /// retargeted do (a rebuilt caller whose original call is covered by an entry of its own would otherwise call
    /// the original, and the callee's copy would lose the way in it had through the caller's old copy). When the
    /// callee's patch is undone, this copy keeps calling its copy (enable words clear: the original accesses run)
    /// until the callee is patched again, whose new copy retargets the call as a call site in a live copy.
    func implantBytes(of copy: FunctionCopy, others: [AppliedPatch]) -> [UInt8] {
        var bytes = copy.bytes
        for p in others {
            guard let callee = p.copy else { continue }
            for e in callee.callSiteEntries(in: copy) {
                guard let w = e.writes.first, w.address >= copy.address else { continue }
                let at = Int(w.address &- copy.address)
                guard at + w.replacement.count <= bytes.count, Array(bytes[at..<at + w.original.count]) == w.original else { continue }
                bytes.replaceSubrange(at..<at + w.replacement.count, with: w.replacement)
            }
        }
        return bytes
    }
}
