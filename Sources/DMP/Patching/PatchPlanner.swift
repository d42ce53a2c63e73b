import VMMKit
import X86Disassembler

/// Turns a located hot instruction into a patch (DESIGN.md, DMP steps 3–6):
/// asks the device, chooses the shape, encodes it into the implant, checks the
/// guest's mappings and the guard rules, and writes it with the patcher.
///
/// Not thread-safe: the middleware calls it under its planning lock.
package final class PatchPlanner {
    /// Unowned, as in ``Patcher``: the VM holds DMP in its exit chain, so a strong reference made a
    /// cycle that leaked every VM DMP was installed on (LeakSanitizer).
    unowned let vm: VirtualMachine
    let rings: PVRingDevice?
    let configuration: DMPConfiguration
    let implant: Implant
    let patcher: Patcher
    let disassembler: X86Disassembler
    /// The cache-line size the implant's shared words are kept apart by.
    static let cacheLine = 64
    /// Where a read's shared slot lies in its data, after the enable word (8-byte aligned, same cache line).
    static let slotOffset: UInt64 = 8
    /// The number the next shared slot gets (``FastPathSlot/index``; the report names it).
    var nextSlotIndex = 0
    /// Dead padding already holding an entry's `jmp rel32` (never handed out twice).
    var usedPadding: [Range<UInt64>] = []
    /// The guest-virtual start of every function copy written, with the start of the function it copies (copies are
    /// never freed: a caller copied while one was entered through its call sites keeps calling it).
    var copyStarts: [UInt64: UInt64] = [:]
    /// Whether the CPU runs `lahf`/`sahf` in 64-bit mode (bodies save live flags with them, not `pushfq`).
    let lahf: Bool
    /// The port of the rings' kick register (``PVRingKick`` attached for `rings`), if any: ring
    /// appends kick a sleeping poller through it.
    let kickPort: UInt16?
    /// Set when a grant told the ring device a producer is coming (``PVRingDevice/producerAttached()``, before the
    /// patch is written); the middleware clears it before a plan and, when the plan leaves no ring append live
    /// (refused, or its ring grant given back), tells the device the producers are gone.
    package var announcedRingProducer = false

    /// Creates a planner.
    package init(vm: VirtualMachine, rings: PVRingDevice?, configuration: DMPConfiguration,
                 implant: Implant, patcher: Patcher) throws(DMPRefusal) {
        self.vm = vm; self.rings = rings; self.configuration = configuration
        self.implant = implant; self.patcher = patcher
        let extended = (try? vm.backend.supportedCPUID())?.first { $0.function == 0x8000_0001 }
        lahf = extended.map { $0.ecx & 1 != 0 } ?? false
        kickPort = rings.flatMap { rings in
            vm.bus.attached.first { $0.space == .pio && ($0.device as? PVRingKick)?.rings === rings }
        }.map { UInt16(truncatingIfNeeded: $0.range.start.rawValue) }
        do { disassembler = try X86Disassembler() } catch {
            throw DMPRefusal(.plan, "cannot open the disassembler: \(error)")
        }
    }

    // MARK: Fast paths

    /// A granted fast path and the route the implanted code serves.
    package struct Grant: Sendable {
        /// What the implanted code serves (the body is emitted from it again when a copy is rebuilt).
        package var route: FastPathRoute
        /// The site, its enable word and hit counter.
        package var plan: SitePlan
    }

    /// Asks the device that owns `site`'s access for a fast path; builds the route.
    /// `memoryTarget` is the linear address the instruction accesses (MMIO).
    func grant(for site: ExitSite, instruction: X86Instruction, virtualAddress: UInt64, physicalAddress: GuestAddress,
               memoryTarget: UInt64?, cpl: Int, placement: ImplantPlacement, paging: PagingContext,
               kick: FastPathRoute.Target? = nil) throws(DMPRefusal) -> Grant {
        if cpl == 3 && !configuration.userModeFastPaths {
            throw DMPRefusal(.fastPath, "the code runs at CPL3 and user-mode fast paths are off (DMPConfiguration.userModeFastPaths)")
        }
        // An instruction no body can serve is refused for what it is, before the device is asked: an `or [m], r` on a
        // register exits twice (its read and its write), and the device declining the read says less than the shape.
        if case .failure(let why) = instruction.accessShape { throw DMPRefusal(.fastPath, "\(instruction): \(why)") }
        let (space, ringIndex) = target(of: site)
        let size = Int(site.size)
        // The enable word and the hit counter in cache lines of their own: the device reads the enable
        // word whenever it refreshes its grants (every ring batch, from the poller's CPU), and a hit
        // counter in that line would move it back and forth between that CPU and the vCPU's on every batch.
        // A read is offered a shared slot beside its enable word, in the same line: the device writes both when
        // the register changes, and the body reads both (one line to fetch).
        let data = try implant.allocateData(2 * PatchPlanner.cacheLine, alignment: PatchPlanner.cacheLine)
        let enableGPA = data.start
        let slotGPA = GuestAddress(data.start.rawValue + PatchPlanner.slotOffset)
        let hitsGPA = GuestAddress(data.start.rawValue + UInt64(PatchPlanner.cacheLine))
        let word: FastPathEnableWord
        var slot: FastPathSlot?
        let slotIndex = nextSlotIndex
        if configuration.dryRun {
            word = FastPathEnableWordStorage(count: 1)[0]
            if site.direction == .read { slot = FastPathSlotStorage(count: 1)[0] }
        } else {
            do { word = try FastPathEnableWord(memory: vm.memory, at: enableGPA) } catch {
                throw DMPRefusal(.implant, "cannot place an enable word at \(enableGPA): \(error)")
            }
            if site.direction == .read {
                do { slot = try FastPathSlot(memory: vm.memory, at: slotGPA, index: slotIndex) } catch {
                    throw DMPRefusal(.implant, "cannot place a shared slot at \(slotGPA): \(error)")
                }
            }
        }
        let granted: FastPathDescription
        do {
            granted = try vm.bus.grantFastPath(space: space, address: site.address, size: size, direction: site.direction,
                                               ring: ringIndex, slot: slot, enableWord: word).description
        } catch {
            throw DMPRefusal(.fastPath, "\(error)" + Self.noRingHint(error, direction: site.direction, ring: ringIndex, rings: rings != nil))
        }
        var slotRead = false
        if case .sharedSlotRead = granted.kind { slotRead = true; nextSlotIndex += 1 }
        var ring: RingMapping?
        var pendingRings: [RingMapping] = []
        do throws(DMPRefusal) {
            if case .ringAppend(let index, let mode) = granted.kind {
                if mode == .synchronous && kick == nil {
                    // A bounded wait that runs out must end in an exit that applies the entry: without a kick
                    // register the code may write, the access would complete before the device saw it.
                    throw DMPRefusal(.fastPath, "a synchronous ring append needs a kick register this code may write "
                                     + "(no ring kick port, or the guest's TSS I/O bitmap does not permit it at CPL3)")
                }
                ring = try mappedRing(index, synchronous: mode == .synchronous, cpl: cpl, placement: placement, paging: paging,
                                      kick: kick)
                // A synchronous append counts the iterations it waits, in the word after its hit counter.
                if mode == .synchronous { ring?.waitCounter = placement.virtualAddress(of: GuestAddress(hitsGPA.rawValue &+ 8)) }
                if !configuration.dryRun {
                    rings?.producerAttached()
                    announcedRingProducer = true
                }
            }
            // A read the device did not declare independent of its pending ring entries is served
            // only while the device's rings are empty (DESIGN.md step 3); the body checks them.
            if site.direction == .read && !granted.independentOfPendingRingEntries {
                for index in ringsOfDevice(at: site.address, space: space) {
                    pendingRings.append(try mappedRing(index, synchronous: false, cpl: cpl, placement: placement, paging: paging))
                }
            }
        } catch {
            vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word)
            throw error
        }
        let target: FastPathRoute.Target
        if site.kind == .io {
            target = .port(UInt16(truncatingIfNeeded: site.address))
        } else {
            guard let m = memoryTarget else {
                vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word)
                throw DMPRefusal(.fastPath, "the instruction's memory operand could not be evaluated")
            }
            target = .memory(m)
        }
        var route = FastPathRoute(target: target, width: size, direction: site.direction, kind: granted.kind,
                                  enableWord: placement.virtualAddress(of: enableGPA),
                                  hitCounter: placement.virtualAddress(of: hitsGPA), ring: ring,
                                  slot: slotRead ? placement.virtualAddress(of: slotGPA) : nil,
                                  pendingRings: pendingRings)
        route.lockedCounters = configuration.lockedCounters ?? (vm.vcpus.count > 1)
        if configuration.dryRun { vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word) }
        var plan = SitePlan(site: site, virtualAddress: virtualAddress, physicalAddress: physicalAddress,
                            instruction: instruction.description, fastPath: PatchPlanner.describe(granted.kind),
                            userMode: cpl == 3, enableWord: configuration.dryRun ? nil : word,
                            grant: configuration.dryRun ? nil : (space, site.address), hitCounter: hitsGPA, data: data)
        plan.granted = granted
        if case .ringAppend(let index, _) = granted.kind { plan.ring = index }
        if slotRead && !configuration.dryRun { plan.slot = slotGPA }
        if let r = ring, r.waitCounter != nil {
            plan.waitCounter = (GuestAddress(hitsGPA.rawValue &+ 8), r.synchronousWaitLimit)
        }
        return Grant(route: route, plan: plan)
    }

    /// Ring `index` as implanted code sees it: at the placement's offset, mapped writable for `cpl`
    /// (checked by a walk), kicking through `kick` (``ringKick(for:)``).
    func mappedRing(_ index: Int, synchronous: Bool, cpl: Int, placement: ImplantPlacement,
                    paging: PagingContext, kick: FastPathRoute.Target? = nil) throws(DMPRefusal) -> RingMapping {
        guard let rings, index >= 0, index < rings.targets.count else {
            throw DMPRefusal(.fastPath, "the device named ring \(index), which does not exist")
        }
        let base = rings.base.rawValue + UInt64(index) * rings.stride
        let va = base &+ placement.offset
        let physical: GuestAddress
        do { physical = try vm.memory.translate(va, paging: paging, access: cpl == 3 ? [.write, .user] : [.write]).physical } catch {
            throw DMPRefusal(.implant, "ring \(index) is not mapped writable at \(hex(va)): \(error)")
        }
        guard physical.rawValue == base else {
            throw DMPRefusal(.implant, "ring \(index) is not mapped at \(hex(va)) (that address maps \(physical))")
        }
        return RingMapping(base: va, slotCount: rings.slotCount, synchronous: synchronous,
                           synchronousWaitLimit: UInt32(clamping: max(1, configuration.synchronousWaitLimit)), kick: kick)
    }

    /// The kick register bodies for `located` may write (a sleeping poller, a synchronous wait that ran
    /// out): the port of the ``PVRingKick`` attached for the rings, always at CPL0; at CPL3 only where the
    /// guest's TSS I/O bitmap permits it (KVM PVM checks the bitmap, not the user IOPL; an `out` the guest
    /// may not make would fault). Without one a body still falls back to the original access when it sees
    /// the poller asleep before publishing (that exit wakes it).
    func ringKick(for located: LocatedInstruction) -> FastPathRoute.Target? {
        guard let port = kickPort else { return nil }
        if located.cpl == 0 { return .port(port) }
        return ioBitmapPermits(port, tr: located.specialRegisters.tr, paging: located.paging) ? .port(port) : nil
    }

    /// Whether the 64-bit TSS at `tr` lets CPL3 write one byte to `port`: the I/O map base at offset 102,
    /// the port's bit clear, and both bytes the CPU reads within the limit.
    func ioBitmapPermits(_ port: UInt16, tr: Segment, paging: PagingContext) -> Bool {
        func byte(_ offset: UInt64) -> UInt8? {
            guard let t = try? vm.memory.translate(tr.base &+ offset, paging: paging) else { return nil }
            return try? vm.memory.read(UInt8.self, at: t.physical)
        }
        guard tr.present, tr.limit >= 103, let lo = byte(102), let hi = byte(103) else { return false }
        let at = (UInt64(lo) | UInt64(hi) << 8) + UInt64(port / 8)
        guard at + 1 <= UInt64(tr.limit), let bits = byte(at) else { return false }
        return bits & (1 << (port % 8)) == 0
    }

    /// The indices of the rings whose entries go to the device that owns `address`.
    func ringsOfDevice(at address: UInt64, space: BusSpace) -> [Int] {
        guard let rings, let owner = vm.bus.device(at: address, space: space) else { return [] }
        return rings.targets.indices.filter { i in
            let t = rings.targets[i]
            return t.space == space && vm.bus.device(at: t.address, space: t.space)?.range == owner.range
        }
    }

    /// Asks the device whether it would grant `site` a fast path (with a host-side enable word, revoked at once).
    package func probeFastPath(_ site: ExitSite) throws(DMPRefusal) {
        let (space, ring) = target(of: site)
        let word = FastPathEnableWordStorage(count: 1)[0]
        do {
            _ = try vm.bus.grantFastPath(space: space, address: site.address, size: Int(site.size), direction: site.direction,
                                         ring: ring, slot: FastPathSlotStorage(count: 1)[0], enableWord: word)
        } catch {
            throw DMPRefusal(.fastPath, "\(error)")
        }
        vm.bus.revokeFastPath(space: space, address: site.address, enableWord: word)
    }

    /// The bus space of `site`'s access and the ring (an index into the ring device's targets) whose target
    /// register it is, if any.
    func target(of site: ExitSite) -> (space: BusSpace, ring: Int?) {
        let space: BusSpace = site.kind == .io ? .pio : .mmio
        let ring = rings?.targets.firstIndex { $0.space == space && $0.address == site.address && $0.width == Int(site.size) }
        return (space, ring)
    }

    /// Revokes what `grants` were given (a plan that failed after asking the devices).
    func revoke(_ grants: [Grant]) {
        for g in grants {
            guard let w = g.plan.enableWord, let at = g.plan.grant else { continue }
            w.store(false)
            vm.bus.revokeFastPath(space: at.space, address: at.address, enableWord: w)
        }
    }

    /// A fast path for the report.
    static func describe(_ k: FastPathKind) -> String {
        switch k {
        case .constantRead(let v): "constant 0x\(String(v, radix: 16))"
        case .sharedSlotRead(let s): "shared slot \(s)"
        case .discardWrite: "discard"
        case .ringAppend(let r, let m): "ring \(r) (\(m == .synchronous ? "synchronous" : "asynchronous"))"
        case .tscCounter: "TSC counter"
        }
    }
}
