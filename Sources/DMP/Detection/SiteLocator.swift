import VMMKit
import X86Disassembler

/// The instruction that caused a candidate exit, found by ``SiteLocator``.
package struct LocatedInstruction: Sendable {
    /// How the instruction's start was established.
    package enum Confirmation: Hashable, Sendable {
        /// RIP moved when the access completed: the instruction is `[before, after)`.
        case bracketed
        /// RIP did not move; the one candidate ending at RIP that reproduces the
        /// exit is the one a forward decode from the named symbol's start reaches.
        case symbol(String)
        /// RIP did not move and lies in implanted code (a function copy): the
        /// candidate ending at RIP that reproduces the exit is the one the
        /// copy's layout puts there (``ImplantedInstruction``, named).
        case implanted(String)
        /// RIP did not move, no function symbol covers it, and exactly one
        /// candidate ending at RIP reproduces the exit: probably right, not proven.
        case unconfirmed
    }

    /// The decoded instruction (``X86Instruction/address`` is its start in RIP space).
    package var instruction: X86Instruction
    /// The exit's access the instruction reproduces.
    package var access: X86ExitAccess
    /// The instruction's guest-virtual start (RIP space; equals the linear address in 64-bit mode).
    package var virtualAddress: UInt64
    /// The guest-physical address of its first byte under ``addressSpace``.
    package var physicalAddress: GuestAddress
    /// The address space: CR3 with PCID and flag bits masked out.
    package var addressSpace: UInt64
    /// The privilege level the instruction ran at.
    package var cpl: Int
    /// The paging state it ran under (CR3, WP, NXE, SMEP, SMAP, mode).
    package var paging: PagingContext
    /// The special registers read at the exit (mode, segments, CR4 for the implant's checks).
    package var specialRegisters: SpecialRegisters
    /// Where RIP was at the exit relative to the instruction.
    package var position: RIPPosition
    /// How the start was established.
    package var confirmation: Confirmation

    /// The guest-virtual address right after the instruction.
    package var endAddress: UInt64 { virtualAddress &+ UInt64(instruction.length) }
}

/// An instruction of implanted code as DMP laid it out (a function copy's copied or relocated instruction):
/// what confirms the start of an instruction no symbol covers, in place of a forward decode.
package struct ImplantedInstruction: Sendable {
    /// Where it starts (guest-virtual).
    package var start: UInt64
    /// What holds it, for reasons (`the copy of f`).
    package var name: String
    /// The instruction before it in the original function (nil for the first): for the interrupt-shadow check.
    package var previous: X86Instruction?

    /// Creates a record.
    package init(start: UInt64, name: String, previous: X86Instruction?) {
        self.start = start; self.name = name; self.previous = previous
    }
}

/// Finds the instruction behind a candidate exit (DESIGN.md, "The DMP
/// pipeline", step 2), or refuses with a reason (``DMPRefusal/Stage/locate``).
///
/// Call ``locate(_:context:)`` from a handler *after* the rest of the chain
/// has handled the exit (``ExitContext/forward(_:)``: a read has its data)
/// and *before* anything completed the access. It always brackets: RIP at
/// the exit, ``ExitContext/completePendingAccess()``, RIP after.
/// - RIP moved: the instruction is `[before, after)`; it is decoded and must
///   have that length and reproduce the exit (port and width, or an
///   effective address translating to the exit's GPA, width, direction).
/// - RIP did not move (RIP was already past: `out` here, MMIO stores on
///   hardware): the candidates ending at RIP are decoded and those that
///   reproduce the exit kept; a forward decode from the enclosing function
///   symbol's start must reach RIP through one of them. In implanted code
///   (a function copy: no symbol covers it) the copy's layout says which
///   instruction ends at RIP (``ImplantedInstruction``); elsewhere, without a
///   covering function symbol, a single survivor is accepted, marked
///   ``LocatedInstruction/Confirmation/unconfirmed``.
///
/// Code is decoded in the mode CS says, through the vCPU's page walk.
/// Refused: compatibility-mode code, an instruction in an interrupt shadow
/// (the vCPU events say so, or the instruction before it is `sti`,
/// `mov ss` or `pop ss`; without a symbol, where RIP is already past and the
/// events can no longer tell, any decoding of the bytes before it that is), none or several survivors, and everything that
/// cannot be read (unmapped code, an unsupported paging mode).
///
/// Each call reads the special registers and the vCPU events (an ioctl each
/// on KVM): for candidates only, never on every exit. One locator per vCPU
/// thread, or calls serialized by the caller (it owns a Capstone handle).
package final class SiteLocator {
    private let disassembler: X86Disassembler
    /// The image's symbols (guest-virtual addresses).
    package let symbols: SymbolTable
    /// The most instructions a forward decode from a symbol's start visits.
    package static let forwardDecodeLimit = 4096

    /// Creates a locator. Throws a refusal when Capstone cannot be opened.
    package init(symbols: SymbolTable = SymbolTable()) throws(DMPRefusal) {
        do { disassembler = try X86Disassembler() } catch { throw DMPRefusal(.locate, "no decoder: \(error)") }
        self.symbols = symbols
    }

    /// Locates the instruction behind `exit`, the exit `context` is handling.
    ///
    /// - Parameter implanted: the implanted instruction (a function copy's) ending at a guest-virtual address,
    ///   if implanted code holds one there: it decides among candidates where RIP is past the instruction.
    package func locate(_ exit: VMExit, context: ExitContext,
                        implanted: (UInt64) -> ImplantedInstruction? = { _ in nil }) throws(DMPRefusal) -> LocatedInstruction {
        let access: X86ExitAccess
        switch exit {
        case .io(let io): access = X86ExitAccess(io)
        case .mmio(let m): access = X86ExitAccess(m)
        default: throw DMPRefusal(.locate, "not a port I/O or MMIO exit (\(exit.kind))")
        }
        guard !context.isCompletingAccess else {
            throw DMPRefusal(.locate, "exit taken while completing an earlier access (a further element of one instruction)")
        }
        // Everything read before the completion: it changes registers (a load's destination) and the events.
        let before: UInt64, registers: Registers, sregs: SpecialRegisters, shadow: UInt8
        do throws(VMError) {
            before = try context.instructionPointerAtExit()
            registers = try context.registers()
            sregs = try context.specialRegisters()
            shadow = try context.vcpuEvents().interruptShadow
            if context.hasPendingAccess { _ = try context.completePendingAccess() }
        } catch {
            throw DMPRefusal(.locate, "cannot bracket the access: \(error)")
        }
        guard let after = context.instructionPointerAfterCompletion else {
            throw DMPRefusal(.locate, "cannot bracket the access: its completion was cut short (the VM is stopping)")
        }
        let code: X86CodeContext
        do { code = try X86CodeContext(memory: context.memory, specialRegisters: sregs) } catch {
            if case .compatibilityMode = error { throw DMPRefusal(.locate, "compatibility-mode code (long mode with CS.L clear)") }
            throw DMPRefusal(.locate, "\(error)")
        }
        guard shadow == 0 else {
            throw DMPRefusal(.locate, "instruction at \(hex(before)) in an interrupt shadow (after \(shadow & 2 != 0 ? "sti" : "mov ss"))")
        }

        let moved = after &- before
        let instruction: X86Instruction, position: RIPPosition, confirmation: LocatedInstruction.Confirmation
        var previous: X86Instruction?
        if moved >= 1 && moved <= 15 {
            let i: X86Instruction
            do { i = try disassembler.decode(at: before, in: code) } catch {
                throw DMPRefusal(.locate, "cannot decode the instruction at \(hex(before)): \(error)")
            }
            guard i.length == Int(moved) else {
                throw DMPRefusal(.locate, "RIP moved \(moved) bytes but the instruction at \(hex(before)) (\(i)) is \(i.length)")
            }
            guard i.reproduces(access, registers: registers, context: code) else {
                throw DMPRefusal(.locate, "\(i) at \(hex(before)) does not reproduce the exit (\(access))")
            }
            instruction = i
            position = .onInstruction(length: i.length)
            confirmation = .bracketed
            if let s = function(containing: before), let walk = forwardDecode(from: s.address, to: i.nextAddress, code: code),
               walk.last.address == before {
                previous = walk.previous
            }
        } else if moved == 0 {
            let survivors = disassembler.candidatesEnding(at: before, in: code)
                .filter { $0.reproduces(access, registers: registers, context: code) }
            position = .pastInstruction
            if let known = implanted(before) {
                // Two decodings can reproduce the exit (`40 89 3a` and `89 3a` both store edi at [rdx]): the
                // copy's layout knows which instruction it put there.
                guard let i = survivors.first(where: { $0.address == known.start }) else {
                    throw DMPRefusal(.locate, "the instruction ending at RIP \(hex(before)) in \(known.name) does not reproduce the exit (\(access))")
                }
                instruction = i
                previous = known.previous
                confirmation = .implanted(known.name)
            } else if let s = function(containing: before &- 1) {
                guard let walk = forwardDecode(from: s.address, to: before, code: code) else {
                    throw DMPRefusal(.locate, "a forward decode from \(s.name) does not end at RIP \(hex(before)) (data in text, or RIP is not an instruction boundary)")
                }
                guard survivors.contains(where: { $0.address == walk.last.address && $0.length == walk.last.length }) else {
                    throw DMPRefusal(.locate, "the instruction ending at RIP \(hex(before)) in \(s.name) (\(walk.last)) does not reproduce the exit (\(access))")
                }
                instruction = walk.last
                previous = walk.previous
                confirmation = .symbol(s.name)
            } else {
                guard let only = survivors.first else {
                    throw DMPRefusal(.locate, "no instruction ending at RIP \(hex(before)) reproduces the exit (\(access))")
                }
                guard survivors.count == 1 else {
                    let list = survivors.map { "\($0) at \(hex($0.address))" }.joined(separator: ", ")
                    throw DMPRefusal(.locate, "ambiguous: \(survivors.count) instructions ending at RIP \(hex(before)) reproduce the exit (\(list)) and no function symbol covers it")
                }
                // RIP already past: the events no longer show a shadow, and without a symbol the
                // instruction before is unknown. Refuse if any decoding of the bytes before it sets one.
                if let p = disassembler.candidatesEnding(at: only.address, in: code).first(where: SiteLocator.setsInterruptShadow) {
                    throw DMPRefusal(.locate, "\(only) at \(hex(only.address)) may follow \(p) (no symbol to decode from): possibly in an interrupt shadow")
                }
                instruction = only
                confirmation = .unconfirmed
            }
        } else {
            throw DMPRefusal(.locate, "RIP moved from \(hex(before)) to \(hex(after)) when the access completed: not one instruction")
        }
        if let p = previous, SiteLocator.setsInterruptShadow(p) {
            throw DMPRefusal(.locate, "\(instruction) at \(hex(instruction.address)) follows \(p): in an interrupt shadow")
        }

        let physical: GuestAddress
        do { physical = try code.translate(code.linear(instructionPointer: instruction.address), access: code.fetchAccess) } catch {
            throw DMPRefusal(.locate, "the instruction at \(hex(instruction.address)) does not translate: \(error)")
        }
        return LocatedInstruction(
            instruction: instruction, access: access, virtualAddress: instruction.address, physicalAddress: physical,
            addressSpace: sregs.cr3 & ExitContext.addressSpaceMask, cpl: sregs.cpl, paging: code.paging,
            specialRegisters: sregs, position: position, confirmation: confirmation)
    }

    /// The function symbol covering `address` (a sized one, or the nearest unsized one below).
    private func function(containing address: UInt64) -> GuestSymbol? {
        guard let s = symbols.symbol(containing: address), s.isFunction, s.address <= address else { return nil }
        return s
    }

    /// Decodes forward from `start` to the instruction ending exactly at `end`; that
    /// instruction and the one before it (nil when it is the first). `nil` when the
    /// decode steps over `end`, fails first, or needs more than ``forwardDecodeLimit`` instructions.
    private func forwardDecode(from start: UInt64, to end: UInt64, code: X86CodeContext) -> (last: X86Instruction, previous: X86Instruction?)? {
        var address = start
        var previous: X86Instruction?
        for _ in 0..<SiteLocator.forwardDecodeLimit {
            guard address < end, let i = try? disassembler.decode(at: address, in: code) else { return nil }
            let next = i.nextAddress
            if next == end { return (i, previous) }
            guard next > address, next < end else { return nil }
            previous = i
            address = next
        }
        return nil
    }

    /// Whether `i` makes the next instruction run in an interrupt shadow (`sti`, `mov ss`, `pop ss`).
    static func setsInterruptShadow(_ i: X86Instruction) -> Bool {
        switch i.mnemonic {
        case "sti": true
        case "mov": i.operandText.hasPrefix("ss,")
        case "pop": i.operandText == "ss"
        default: false
        }
    }
}
