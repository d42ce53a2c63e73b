import ArgumentParser
import VMMKit

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Benchmarks (see Documentation/Benchmarks.md).")
    func run() throws {
        printError("minivmm bench: not implemented yet")
        throw ExitCode(2)
    }
}
