import Logging
import VMMKit

/// Dynamic Memory Paravirtualization as exit-chain middleware: add it to a VM
/// (`vm.addExitHandler(DMPMiddleware(configuration))`) and it watches exits,
/// finds the guest instructions that cause most of them and patches them into
/// implanted fast paths (DESIGN.md, "The DMP pipeline").
///
/// The pipeline is being built (see README's status table); today the
/// middleware passes every exit on unchanged.
public final class DMPMiddleware: ExitHandler, @unchecked Sendable {
    /// The configuration it was created with.
    public let configuration: DMPConfiguration
    /// Where DMP tells its decisions (hot, patched, refused and why, undone and why).
    public let logger: Logger

    /// Creates the middleware.
    /// - Parameters:
    ///   - configuration: thresholds, strategies, verification, dry run.
    ///   - logger: where decisions are logged; the VMM's own logger, so they appear in its logs.
    public init(_ configuration: DMPConfiguration = DMPConfiguration(), logger: Logger = Logger(label: "vmmkit.dmp")) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Passes the exit on (the pipeline is not wired yet).
    public func handle(_ exit: VMExit, context: ExitContext) throws(VMError) -> ExitResult { .pass }

    /// Every site DMP has looked at, in the order they became hot.
    public func report() -> [PatchSite] { [] }
}
