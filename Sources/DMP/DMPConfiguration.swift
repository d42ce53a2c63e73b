import VMMKit

/// How DMP decides, patches and checks (``DMPMiddleware``).
public struct DMPConfiguration: Sendable {
    /// The patch shapes DMP may use (DESIGN.md, DMP step 4).
    public struct Strategies: OptionSet, Hashable, Sendable {
        /// The raw bits.
        public let rawValue: UInt8
        /// Creates a set from raw bits.
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// A hot instruction of five bytes or more jumps to a stub that does the fast path.
        public static let instructionStub = Strategies(rawValue: 1 << 0)
        /// The enclosing (sized) function is copied into the implant with its hot instructions rewritten.
        public static let functionCopy = Strategies(rawValue: 1 << 1)
        /// A hot instruction in a function no entry of its copy reaches (a tiny accessor called only through a
        /// function pointer) is served from a copy of its caller, found at the exit on the guest's stack, in which
        /// that indirect call compares its target with the accessor and calls the accessor's copy when they match.
        public static let callPromotion = Strategies(rawValue: 1 << 2)
        /// All of them.
        public static let all: Strategies = [.instructionStub, .functionCopy, .callPromotion]
    }

    /// Exits a site must cause within ``window`` to become a candidate: 1 to ``HotspotDetector/maximumWindow``.
    public var threshold: Int = 64
    /// The sliding window, in exits of the vCPU (all sites) over which ``threshold`` is counted: 1 to
    /// ``HotspotDetector/maximumWindow`` (a window below ``threshold`` is raised to it). Each vCPU's detector keeps
    /// 4 bytes per exit of the window.
    public var window: Int = 4096
    /// Which patch shapes to use.
    public var strategies: Strategies = .all
    /// Whether fast paths may serve code running at CPL3. A user-mode stub bypasses
    /// the guest's I/O permission checks (IOPL, the TSS bitmap) and cannot tell
    /// address spaces apart: turn this on only for trusted guests. The report names such sites.
    public var userModeFastPaths = false
    /// Whether to measure every patch and undo those that do not pay.
    public var verify = true
    /// Exits of the site after a patch before it is judged (hits served in the guest count too): whether it is
    /// entered at all. At least 0.
    public var verifyAfterAccesses: Int = 4096
    /// A patch of CPL0 code (whose bodies run natively on hardware virtualization but may run emulated, a cost
    /// no count shows) is judged by an A/B trial (``RateTrial``): the guest's original bytes put back and the patch
    /// written again in alternating phases of this many seconds, its sites' accesses per second compared phase by phase.
    /// 0 to 3600 (a phase lasts at least a millisecond).
    public var trialPhaseSeconds: Double = 0.05
    /// The off/on pairs of phases an A/B trial measures; the median of their ratios decides. At least 1.
    public var trialPairs: Int = 3
    /// The accesses a trial phase needs to count (a phase short of them runs on, up to four times its length;
    /// a pair still short of them is idle). At least 0 (0 counts as 1).
    public var trialMinimumAccesses: Int = 32
    /// The share of the guest's time A/B trials of a site may take: a lost trial's back-off is at least the
    /// site's exits over the trial's length divided by this share (``RateTrial/backOff(offRate:sites:configuration:)``).
    /// 0.001 to 1.
    public var trialTimeShare: Double = 0.05
    /// The median ratio of a trial's pairs (accesses per second patched over unpatched) below which
    /// the patch is undone as slower. 0 to 1000. The default, 1, keeps only a patch measured at least as fast
    /// as the original code: a CPL0 patch must win to stay (below 1 a patch measured a little slower, within
    /// the noise, would be kept).
    public var trialMinimumRatio: Double = 1.0
    /// Verification passes in a row at which an A/B trial's phase switch may find a vCPU paused inside the bytes
    /// to write (the switch then changes nothing and is asked for again at the next pass) before the trial gives
    /// up and the patch is undone with the reason. At least 1.
    public var trialSwitchBusyPasses: Int = 50
    /// Accesses of a patched site (served in the guest or fallen back) that make one verification window. Each
    /// window's cost per access (exits, kicks and wait iterations) is judged against the one exit per access the
    /// site cost unpatched, over the patch's whole life. At least 1.
    public var verifyWindowAccesses: Int = 128
    /// A window this old closes with what it has: judged with at least an eighth of ``verifyWindowAccesses``
    /// accesses, otherwise skipped as idle (a site the guest stopped using is not undone). 0 to 86,400 seconds.
    public var verifyWindowSeconds: Double = 1
    /// The cost per access, in exits, above which a window loses; at half of it or less a window pays and ends
    /// a losing streak. 0 to 1000.
    public var verifyCostLimit: Double = 0.9
    /// Windows lost in a row after which the patch is undone. At least 1.
    public var verifyLosingWindows: Int = 3
    /// How many iterations of a synchronous ring append's wait for the consumer count as one exit. On this
    /// machine class an iteration (a load and `pause`) takes about 25 ns natively and an exit from CPL3 20–40 µs.
    /// At least 1.
    public var waitIterationsPerExit: Int = 1000
    /// The bound, in iterations, on a synchronous ring append's wait for the consumer to apply its entry; past
    /// it the body writes the rings' kick register, an exit that applies the entry. About two exits' worth
    /// (``waitIterationsPerExit``): a consumer that polls applies an entry within a few hundred iterations, and
    /// one that is not running (its thread descheduled on a loaded host) is not waited for longer than the exit
    /// the kick costs anyway. (It was 65,536, ~1.6 ms here: under load appends waited 30,000–45,000 iterations.)
    /// 1 to 2^32 − 1.
    public var synchronousWaitLimit: Int = 2048
    /// The first back-off, in exits of the site, before an undone site may be patched again; it doubles on every undo
    /// (at most 20 times). 1 to ``maximumBackoff``.
    public var initialBackoff: Int = 1 << 14
    /// Undos after which a site is never patched again. At least 1.
    public var maximumUndos: Int = 4
    /// Whether implanted bodies count their hits (and a synchronous append its wait iterations) with locked
    /// instructions (`lock inc`, `lock add`), so that vCPUs running the same body at once lose no count;
    /// verification judges patches on these counts. `nil` (the default): locked when the VM has more than one
    /// vCPU, plain in a single-vCPU VM (where no count can be lost and a plain `inc` is cheaper).
    public var lockedCounters: Bool?
    /// Report what would be patched and patch nothing (no guest byte changes).
    public var dryRun = false
    /// The guest-physical memory DMP places its code and data in: reserved in the
    /// guest's memory map, backed by RAM, not used by anything else.
    public var implantArea: GuestRange = X86Layout.implantArea
    /// The image's symbols (a function copy needs the enclosing function's sized symbol; the report symbolizes sites).
    public var symbols: SymbolTable = SymbolTable()
    /// The guest-physical ranges of the image's code (its loaded segments), which the guest maps at the same
    /// virtual addresses: where a function copy looks for its function and for direct calls into it, when there is
    /// no ``imageLayout`` (with one, the segments are read at their linked virtual addresses).
    public var codeRanges: [GuestRange] = []
    /// The image's sections from its ELF section headers (``use(_:)`` takes them): with them, a page may be guarded
    /// unless it holds writable data (a writable section) or memory outside the image's segments; without them
    /// (`nil`), any page holding a sized data symbol is refused, read-only data too.
    package var imageLayout: ImageLayout?
    /// For tests: only these kinds of function-copy entries are used (nil: every kind the rules allow).
    package var copyEntryKinds: Set<CopyEntry.Kind>?
    /// For tests: whether a plan also serves the other hot-enough sites of the function it copies (false: each
    /// site is planned alone when it gets hot, so later ones rebuild the copy).
    package var planSiblings = true

    /// Takes the symbols, code ranges and section layout of a loaded image (the layout lets DMP guard a code page
    /// that shares its page with read-only data, as images linked without page-aligned sections have).
    public mutating func use(_ image: LoadedImage) {
        symbols = image.symbols
        codeRanges = image.segments
        imageLayout = image.layout
    }

    /// The defaults: threshold 64 in a window of 4,096 exits, both strategies, verification on, user-mode fast paths off.
    ///
    /// Every numeric setting has an allowed range, stated in its documentation; ``validate()`` checks them, and
    /// ``DMPMiddleware`` turns DMP off (patching nothing, ``DMPMiddleware/configurationError`` saying why) for a
    /// configuration outside them.
    public init() {}
}
