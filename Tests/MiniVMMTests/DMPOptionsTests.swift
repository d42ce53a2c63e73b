import ArgumentParser
import Testing
@testable import minivmm

@Suite("minivmm's --dmp options")
struct DMPOptionsTests {
    /// `parse` runs `validate()`, which checks the threshold and the library's ranges (`DMPConfiguration.validate()`)
    /// for the configuration the options make.
    @Test("--dmp-threshold 1...1000000 is accepted; outside it (and numbers that overflow) is a usage error")
    func threshold() throws {
        #expect(try DMPOptions.parse([]).dmpThreshold == 64)
        #expect(try DMPOptions.parse(["--dmp", "--dmp-threshold", "1"]).dmpThreshold == 1)
        #expect(try DMPOptions.parse(["--dmp", "--dmp-threshold", "1000000"]).dmpThreshold == 1_000_000)
        for bad in ["0", "-1", "1000001", "9223372036854775807", "-9223372036854775808", "99999999999999999999"] {
            #expect(throws: (any Error).self, "\(bad)") { try DMPOptions.parse(["--dmp", "--dmp-threshold=\(bad)"]) }
        }
    }
}
