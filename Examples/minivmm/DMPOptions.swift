import ArgumentParser
import DMP
import Logging

/// `--dmp` and its options.
struct DMPOptions: ParsableArguments {
    @Flag(help: "Turn DMP on: patch the guest's hot device accesses into implanted fast paths; print DMP's report on stderr at exit. Enables user-mode fast paths (minivmm runs trusted guests).")
    var dmp = false

    @Flag(help: "Report what DMP would patch; change no guest byte.")
    var dmpDryRun = false

    @Option(help: "Exits a site must cause within the window to become hot.")
    var dmpThreshold: Int = 64

    /// The log level of DMP's decisions on stderr (`MINIVMM_DMP_LOG=info` shows every decision).
    static var logLevel: Logger.Level {
        if let v = environment("MINIVMM_DMP_LOG"), let l = Logger.Level(rawValue: v) { return l }
        return .warning
    }

    /// Whether implanted bodies count with locked instructions (`MINIVMM_DMP_LOCKED_COUNTERS=1` or `0`; unset:
    /// the library's choice, locked with more than one vCPU), for measuring what locked counters cost.
    static var lockedCounters: Bool? {
        switch environment("MINIVMM_DMP_LOCKED_COUNTERS") {
        case "1": true
        case "0": false
        default: nil
        }
    }

    /// Checks `--dmp-threshold` (1 to 1,000,000) and the library's ranges for the settings the options make
    /// (``DMPConfiguration/validate()``), so a bad number is a usage error, not DMP turned off at run time.
    func validate() throws {
        guard (1...1_000_000).contains(dmpThreshold) else { throw ValidationError("bad --dmp-threshold \(dmpThreshold): use 1 to 1000000") }
        do throws(DMPConfigurationError) { try settings().validate() } catch {
            throw ValidationError("bad DMP option: \(error)")
        }
    }

    /// The library's defaults with the settings these options give.
    private func settings() -> DMPConfiguration {
        var c = DMPConfiguration()
        c.threshold = dmpThreshold
        c.dryRun = dmpDryRun
        c.userModeFastPaths = true
        c.lockedCounters = DMPOptions.lockedCounters
        return c
    }

    /// swift-log's handler for the process: DMP's decisions go to stderr, beside minivmm's own messages.
    private static let bootstrapLogging: Void = LoggingSystem.bootstrap(StreamLogHandler.standardError)

    /// The configuration, or nil when DMP is off.
    func configuration() -> DMPConfiguration? {
        guard dmp || dmpDryRun else { return nil }
        DMPOptions.bootstrapLogging
        let c = settings()
        printError("minivmm: DMP on\(dmpDryRun ? " (dry run: no guest byte changes)" : ""); user-mode fast paths enabled (they bypass the guest's I/O permission checks)")
        return c
    }
}
