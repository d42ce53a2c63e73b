import DMP
import Testing
import VMMKit

/// C guests in the idioms of drivers and runtimes nobody here wrote (an embedded printf library, FreeBSD's uart(4)
/// console path, Linux's 8250 console, OpenBSD's com(4) console; the scratch sweep
/// of /work/scratch/realdrv also imitated xv6, Zephyr, U-Boot, Linux's early console, SeaBIOS, virtio-mmio and
/// NVMe), committed before the DMP work they showed was needed.
extension KVMTests {
    /// `sink_out` is reached only through `_out_fct`'s tail jump through the callback pointer: a 3-byte first
    /// instruction, and the dead padding below it already holds `_out_char`'s entry. Its own copy's redirects
    /// after the poll loop (the THR write's path) do not lead back into the poll; the `mov edx, 0x3fd` before the
    /// loop does, on the function's next call. Without it the LSR poll had no way in, DMP promoted the calls on
    /// the stack (`_ntoa_long`'s and `_vsnprintf`'s `call` of `_out_fct`, never of `sink_out`), and a third of
    /// the steady exits stayed.
    @Test("c-printf-cpl3 (mpaland-style printf, gcc -O2): sink_out's LSR poll, which the redirects after its loop do not lead to, is entered before its loop; both its sites served by its own copy, over 90% of the steady exits gone, same output")
    func dmpPrintfCallbackEnteredBeforeItsLoop() throws {
        try expectServedByOwnCopy("c-printf-cpl3", function: "sink_out", sites: 2)
    }

    /// `ns8250_putc` is reached only through `ops->putc` (a 3-byte first instruction, no padding at
    /// `-falign-functions=1`); gcc put each status read after its loop's body, so the 5-byte instructions of the
    /// THRE loop lie on the DELAY path, which never runs while THRE is set. The copy's redirects there were
    /// never taken (the THRE read and the DATA write kept exiting: 80,104 steady exits -> 53,403); the
    /// instructions of its entry block (`mov esi, 0x3d090`, `mov r8d, 5`, ...) run on every call.
    @Test("c-freebsd-cpl3-noalign (FreeBSD's uart(4) path, gcc -O2 -falign-functions=1): ns8250_putc entered through its entry block on every call; its THRE read, DATA write and TEMT read served, over 90% of the steady exits gone, same output")
    func dmpFreeBSDPutcEnteredThroughItsEntryBlock() throws {
        try expectServedByOwnCopy("c-freebsd-cpl3-noalign", function: "ns8250_putc", sites: 3)
    }

    /// OpenBSD's `comcnputc`, reached only through `cn_tab->cn_putc`, starts with a 1-byte `push rbx`, and the
    /// 5-byte instructions of its first TXRDY loop lie on the `delay(1)` path; it ends in gcc's tail call `jmp splx`,
    /// with no `ret`, so its copy was planned as that of a function that never returns: no entry through its entry
    /// block, only the redirect after the data write, which serves the second TXRDY wait (steady exits 91,210 ->
    /// 60,807). A tail call returns to the caller too: the entry block's instructions run on every call.
    @Test("c-openbsd-cpl3 (OpenBSD's com(4) console, gcc -O2 and -noalign): comcnputc, which ends in a tail call (jmp splx) and has no ret, entered through its entry block on every call; both TXRDY reads and the data write served, over 90% of the steady exits gone, same output",
          arguments: ["c-openbsd-cpl3", "c-openbsd-cpl3-noalign"])
    func dmpOpenBSDTailCallingPutcEnteredThroughItsEntryBlock(_ image: String) throws {
        try expectServedByOwnCopy(image, function: "comcnputc", sites: 3)
    }

    /// Linux's 8250 console at gcc -Os: `serial8250_console_putchar` ends in `serial_port_out`'s sibling call (its
    /// epilogue, then `jmp rax` to `io_serial_out`, a 4-byte first instruction, no padding, reached only through the
    /// pointer), and `uart_console_write` calls it directly, so the THR write's return address leads to a `call rel32`
    /// of a function that is no thunk. Before, that refused call promotion and the THR write kept exiting (steady
    /// exits 51,193 -> 25,867); now the tail jump is guarded to `io_serial_out`'s copy in a copy of
    /// `serial8250_console_putchar`, entered through its call sites. The IER save, clear and restore of every
    /// record (3 exits a line, no fast path from the UART) stay.
    @Test("c-linux8250-cpl3-Os (Linux's serial8250_console_write, gcc -Os): the THR write, reached by serial8250_console_putchar's sibling call through port->serial_out, served from a copy of serial8250_console_putchar with its jmp rax guarded; LSR and THR served, over 90% of the steady exits gone, same output")
    func dmpLinux8250SiblingCallPromoted() throws {
        let off = try DMPLibraryRun("c-linux8250-cpl3-Os", commandLine: "iters=300", dmp: false)
        let on = try DMPLibraryRun("c-linux8250-cpl3-Os", commandLine: "iters=300")
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        let thr = try #require(on.report.first { $0.location.hasPrefix("io_serial_out+") && $0.site.address == 0x3f8 }, "\(text)")
        #expect(thr.state == .patched && thr.strategy.hasPrefix("function copy of serial8250_console_putchar") && thr.hitsServed > 1000,
                "\(text)")
        let lsr = try #require(on.report.first { $0.location.hasPrefix("io_serial_in+") && $0.site.address == 0x3fd }, "\(text)")
        #expect(lsr.state == .patched && lsr.hitsServed > 1000, "\(text)")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    /// `c-linux8250-cpl3` with the boot console first: `uart_console_write` gets two putchar functions and calls its
    /// argument (`call r13`); at -Os and -noalign `serial8250_console_putchar` reaches `io_serial_out` by its sibling
    /// call, so the THR write's return address leads to that indirect call, whose target was
    /// `serial8250_console_putchar`. Before, the call was promoted for `io_serial_out`, an address it never holds:
    /// the THR write was never served (steady exits 51,197 -> 25,869); now it is promoted for
    /// `serial8250_console_putchar` (the target r13 still held at the exit), whose copy's guarded tail jump reaches
    /// `io_serial_out`'s.
    @Test("c-linux8250-earlycon-cpl3 (-Os, -noalign): the THR write, reached through uart_console_write's call r13 of serial8250_console_putchar and its sibling call, served from uart_console_write's copy (the call promoted for serial8250_console_putchar, its jmp rax for io_serial_out); over 90% of the steady exits gone, same output",
          arguments: ["c-linux8250-earlycon-cpl3-Os", "c-linux8250-earlycon-cpl3-noalign"])
    func dmpLinux8250IndirectCallOfSiblingCaller(_ image: String) throws {
        let off = try DMPLibraryRun(image, commandLine: "iters=300", dmp: false)
        let on = try DMPLibraryRun(image, commandLine: "iters=300")
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop)
        let text = DMPReport.text(on.report)
        // The THR write's rows (at -noalign a direct call of io_serial_out gets a copy of its own too; the accesses are
        // served under the promoting caller's key, `io_serial_out+0xe via uart_console_write+…`).
        let thr = on.report.filter { $0.location.hasPrefix("io_serial_out+") && $0.site.address == 0x3f8 }
        #expect(thr.contains { $0.state == .patched && $0.strategy.contains("serial8250_console_putchar") && $0.hitsServed > 1000 },
                "\(text)")
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10)
    }

    /// The guest at `iters=300` without and with DMP: exit 0 both, `sites` sites of `function` patched in a copy of
    /// it and serving over 1,000 accesses each, same output, over 90% of the steady exits gone.
    private func expectServedByOwnCopy(_ image: String, function: String, sites count: Int,
                                       sourceLocation: SourceLocation = #_sourceLocation) throws {
        let off = try DMPLibraryRun(image, commandLine: "iters=300", dmp: false)
        let on = try DMPLibraryRun(image, commandLine: "iters=300")
        #expect(off.stop == .guestExit(status: 0) && on.stop == off.stop, sourceLocation: sourceLocation)
        let text = DMPReport.text(on.report)
        let sites = on.report.filter { $0.location.hasPrefix(function + "+") }
        #expect(sites.count == count, "\(text)", sourceLocation: sourceLocation)
        for s in sites {
            #expect(s.state == .patched && s.strategy.hasPrefix("function copy of \(function)") && s.hitsServed > 1000, "\(text)",
                    sourceLocation: sourceLocation)
        }
        try on.expectSameOutput(as: off, steadyExitsCutBy: 10, sourceLocation: sourceLocation)
    }
}
