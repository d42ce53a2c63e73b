/// The built-in handler that sends port I/O and MMIO exits to the ``IOBus``.
final class BusDispatchHandler: ExitHandler {
    let strict: Bool
    init(strict: Bool) { self.strict = strict }

    /// Port I/O and MMIO.
    var exitKinds: Set<ExitKind>? { [.io, .mmio] }

    func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult {
        switch exit {
        case .io(let io):
            let size = Int(io.size)
            let port = UInt64(io.port)
            if io.direction == .write {
                for i in 0..<max(1, Int(io.count)) {
                    let value = io.count == 1 ? io.value : context.ioData(at: i)
                    guard let effect = context.bus.write(.pio, address: port, size: size, value: value) else {
                        try unclaimed(.pio, port, .write, context)
                        continue
                    }
                    if case .stopVM(let s) = effect { return .stopVM(.guestExit(status: s)) }
                }
            } else {
                for i in 0..<max(1, Int(io.count)) {
                    let v = context.bus.read(.pio, address: port, size: size)
                    if v == nil { try unclaimed(.pio, port, .read, context) }
                    context.completeRead(v ?? allOnes(size: size), at: i)
                }
            }
            return .handled
        case .mmio(let m):
            let size = Int(m.size)
            if m.direction == .write {
                guard let effect = context.bus.write(.mmio, address: m.address.rawValue, size: size, value: m.value) else {
                    try unclaimed(.mmio, m.address.rawValue, .write, context)
                    return .handled
                }
                if case .stopVM(let s) = effect { return .stopVM(.guestExit(status: s)) }
            } else {
                let v = context.bus.read(.mmio, address: m.address.rawValue, size: size)
                if v == nil { try unclaimed(.mmio, m.address.rawValue, .read, context) }
                context.completeRead(v ?? allOnes(size: size))
            }
            return .handled
        default:
            return .pass
        }
    }

    private func unclaimed(_ space: BusSpace, _ address: UInt64, _ dir: AccessDirection, _ context: ExitContext) throws(VMError) {
        guard strict else { return }
        throw .unclaimedAccess(space: space, address: address, direction: dir, vcpu: context.vcpuID,
                               rip: try? context.registers().rip)
    }
}
