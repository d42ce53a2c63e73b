import DMP
import VMMKit

/// The configuration of the mock A/B trial tests (``TrialSwitchTests``, ``TrialRingPollerTests``): function copies
/// only, hot after `threshold` exits, one pair of 5 ms phases that need one access each, a long back-off; `f` (of
/// `fSize` bytes at `base`) followed by dead padding up to `g` (1 byte at `gAddress`), code in the page at `base`.
func trialTestConfiguration(threshold: Int, base: UInt64, fSize: UInt64, gAddress: UInt64,
                            busyPasses: Int = 50) -> DMPConfiguration {
    var c = DMPConfiguration()
    c.threshold = threshold
    c.strategies = .functionCopy
    c.trialPhaseSeconds = 0.005
    c.trialPairs = 1
    c.trialMinimumAccesses = 1
    c.trialSwitchBusyPasses = busyPasses
    c.initialBackoff = 1 << 20
    c.symbols = SymbolTable([
        GuestSymbol(name: "f", address: base, size: fSize, isFunction: true),
        GuestSymbol(name: "g", address: gAddress, size: 1, isFunction: true),
    ])
    c.codeRanges = [GuestRange(start: GuestAddress(base), size: 0x1000)]
    return c
}
