/// The devices of VMMKit's minimal x86 platform, as minivmm and the tests use them:
///
/// | device | where |
/// |---|---|
/// | 8250 UART (COM1) | ports `0x3f8..<0x400` |
/// | debug exit (QEMU `isa-debug-exit`) | ports `0xf4..<0xf8` |
/// | POST-code / delay port | port `0x80` |
/// | phase marker | port `0x700` |
/// | ring kick | port `0x704` |
/// | doorbell | MMIO `0xD000_0000`, 4 KiB |
/// | paravirtual rings | memory at ``X86Layout/paravirtualArea``: ring 0 → UART THR (asynchronous, 1 byte), ring 1 → doorbell (synchronous, 4 bytes), then one ring per extra target |
///
/// A VMM with devices of its own attaches them to `vm.bus` beside these; a
/// register of its own that a ring should feed (so that DMP can offer its
/// device a ring append) is an `extraRingTargets` entry of ``install(on:console:ringPolling:ringSlotCount:extraRingTargets:)``.
public struct StandardDevices {
    /// The doorbell's MMIO page.
    public static let doorbellBase: UInt64 = 0xD000_0000
    /// The phase-marker port.
    public static let markerPort: UInt16 = 0x700
    /// The POST-code (I/O delay) port.
    public static let postCodePort: UInt16 = 0x80
    /// The rings' kick port (``PVRingKick``).
    public static let ringKickPort: UInt16 = 0x704

    /// The largest ring ``install(on:console:ringPolling:ringSlotCount:extraRingTargets:)`` accepts: the two
    /// standard rings and one extra ring of this size fit ``X86Layout/ringArea``.
    public static let maximumRingSlotCount: UInt32 = 32_768

    /// The distance between the standard rings' headers for rings of `slotCount` slots: the default
    /// stride while it holds them, else the header and slots rounded up to whole pages.
    public static func ringStride(slotCount: UInt32) -> UInt64 {
        let bytes = PVRingLayout.slotsOffset + UInt64(slotCount) * PVRingLayout.slotSize
        return max(PVRingLayout.defaultStride, (bytes + 4095) / 4096 * 4096)
    }

    /// The UART.
    public let uart: UART8250
    /// The debug-exit port.
    public let debugExit: DebugExitDevice
    /// The doorbell device.
    public let doorbell: DoorbellDevice
    /// The POST-code port.
    public let postCode: PostCodePort
    /// The paravirtual ring device.
    public let rings: PVRingDevice
    /// The phase marker.
    public let marker: PhaseMarker

    /// Attaches the devices to `vm` and adds their exit handlers (ring drain, phase marker).
    /// The UART writes into `console`, which is flushed when the VM stops.
    /// `ringPolling` says whether a polling thread consumes the rings while the
    /// VM runs (on by default; the drain timer runs either way).
    /// `ringSlotCount` is each ring's slot count (a power of two from 2 to
    /// ``maximumRingSlotCount``; small rings fill often, which tests of ordering
    /// want). Up to 512 slots the rings are ``PVRingLayout/defaultStride`` apart
    /// (the static-PV guests' `PVRING_STRIDE`); larger rings are spaced
    /// ``ringStride(slotCount:)`` apart, so ring 1 (the doorbell) moves and a
    /// guest that expects it at the default stride does not find it.
    ///
    /// `extraRingTargets` adds rings 2, 3, ... (in order) for registers of the
    /// VMM's own devices, which it attaches to `vm.bus` itself (before or after
    /// this call, before the VM runs): DMP offers a device a ring append
    /// (``FastPathKind/ringAppend(ring:mode:)``) only for a register a ring
    /// targets, and the rings' consumer applies the entries to the device like
    /// the standard ones. Every ring must fit ``X86Layout/ringArea``: with the
    /// default 512 slots that is 128 rings in all; a layout that does not fit
    /// throws ``VMError/ring(_:)``.
    @discardableResult
    public static func install(on vm: VirtualMachine, console: OutputSink,
                               ringPolling: PVRingPolling = .enabled(),
                               ringSlotCount: UInt32 = 512,
                               extraRingTargets: [PVRingTarget] = []) throws(VMError) -> StandardDevices {
        let uart = UART8250(sink: console)
        let debugExit = DebugExitDevice()
        let doorbell = DoorbellDevice(memory: vm.memory)
        let postCode = PostCodePort()
        let marker = PhaseMarker(port: markerPort)
        let rings: PVRingDevice
        do {
            rings = try PVRingDevice(memory: vm.memory, bus: vm.bus, stride: ringStride(slotCount: ringSlotCount), targets: [
                PVRingTarget(space: .pio, address: 0x3f8, width: 1),
                PVRingTarget(space: .mmio, address: doorbellBase + DoorbellDevice.doorbellOffset, width: 4, synchronous: true),
            ] + extraRingTargets, slotCount: ringSlotCount, polling: ringPolling)
        } catch { throw .ring(error) }
        do {
            try vm.bus.attach(uart, ports: 0x3f8..<0x400)
            try vm.bus.attach(debugExit, ports: 0xf4..<0xf8)
            try vm.bus.attach(postCode, ports: postCodePort..<postCodePort + 1)
            try vm.bus.attach(doorbell, mmio: GuestRange(start: GuestAddress(doorbellBase), size: 0x1000))
            try vm.bus.attach(PVRingKick(rings: rings), ports: ringKickPort..<(ringKickPort + 1))
        } catch { throw .bus(error) }
        rings.attach(to: vm)
        // Neither ring target stops the VM, so a drain's stop reason can be dropped here.
        uart.setRingDrain { [weak rings] in _ = rings?.drain() }
        vm.addExitHandler(marker)
        vm.addPeriodicTask(every: PVRingDevice.drainInterval) { _ throws(VMError) in
            rings.drain(wakePoller: true)
        }
        vm.addStopHook { _ in console.flush() }
        return StandardDevices(uart: uart, debugExit: debugExit, doorbell: doorbell, postCode: postCode, rings: rings, marker: marker)
    }
}
