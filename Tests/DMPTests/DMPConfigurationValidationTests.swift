import DMP
import Logging
import Testing
import VMMKit
import VMMKitTesting

// DMPConfiguration.validate(): every numeric setting has a documented range; a value just inside passes, one just
// outside (NaN and the infinities for Doubles) throws a typed error naming the field, the value and the range.
// DMPMiddleware turns DMP off for an invalid configuration instead of trapping later.

/// `c` with the integer setting `field` set to `value`.
private func with(_ field: String, _ value: Int) throws -> DMPConfiguration {
    let limit = try #require(DMPConfiguration.integerLimits.first { $0.field == field })
    var c = DMPConfiguration()
    c[keyPath: limit.keyPath] = value
    return c
}

/// `c` with the floating-point setting `field` set to `value`.
private func with(_ field: String, _ value: Double) throws -> DMPConfiguration {
    let limit = try #require(DMPConfiguration.numberLimits.first { $0.field == field })
    var c = DMPConfiguration()
    c[keyPath: limit.keyPath] = value
    return c
}

/// The error `c.validate()` throws, or nil.
private func failure(_ c: DMPConfiguration) -> DMPConfigurationError? {
    do throws(DMPConfigurationError) {
        try c.validate()
        return nil
    } catch {
        return error
    }
}

@Suite("DMPConfiguration.validate: each setting's range")
struct DMPConfigurationValidationTests {
    @Test("the defaults are valid")
    func defaults() {
        #expect(failure(DMPConfiguration()) == nil)
    }

    @Test("integer settings: the bounds pass, one past either bound throws naming the field, value and range",
          arguments: DMPConfiguration.integerLimits.map(\.field))
    func integerBounds(field: String) throws {
        let allowed = try #require(DMPConfiguration.integerLimits.first { $0.field == field }).allowed
        #expect(failure(try with(field, allowed.lowerBound)) == nil)
        #expect(failure(try with(field, allowed.upperBound)) == nil)
        var outside = [Int.min]
        if allowed.lowerBound > Int.min { outside.append(allowed.lowerBound - 1) }
        if allowed.upperBound < Int.max { outside += [allowed.upperBound + 1, Int.max] }
        for value in outside where !allowed.contains(value) {
            #expect(failure(try with(field, value)) == .integerOutOfRange(field: field, value: value, allowed: allowed))
        }
    }

    @Test("floating-point settings: the bounds pass; just outside, NaN and both infinities throw",
          arguments: DMPConfiguration.numberLimits.map(\.field))
    func numberBounds(field: String) throws {
        let allowed = try #require(DMPConfiguration.numberLimits.first { $0.field == field }).allowed
        #expect(failure(try with(field, allowed.lowerBound)) == nil)
        #expect(failure(try with(field, allowed.upperBound)) == nil)
        for value in [allowed.lowerBound.nextDown, allowed.upperBound.nextUp, .infinity, -.infinity, -.greatestFiniteMagnitude,
                      .greatestFiniteMagnitude] {
            #expect(failure(try with(field, value)) == .numberOutOfRange(field: field, value: value, allowed: allowed))
        }
        // NaN is not equal to itself: match the case.
        let nan = failure(try with(field, Double.nan))
        guard case .numberOutOfRange(let f, let v, let a) = nan else { Issue.record("NaN accepted: \(String(describing: nan))"); return }
        #expect(f == field && v.isNaN && a == allowed)
        #expect(nan?.field == field)
        #expect(nan?.description == "DMPConfiguration.\(field) is nan; allowed: a finite number from \(allowed.lowerBound) to \(allowed.upperBound)")
    }

    @Test("the documented ranges (pinned: the tables above test whatever they say)")
    func documentedRanges() throws {
        let ints = Dictionary(uniqueKeysWithValues: DMPConfiguration.integerLimits.map { ($0.field, $0.allowed) })
        #expect(ints["threshold"] == 1...(1 << 24) && ints["window"] == 1...(1 << 24))
        #expect(HotspotDetector.maximumWindow == 1 << 24)
        #expect(ints["initialBackoff"] == 1...(1 << 40) && DMPConfiguration.maximumBackoff == 1 << 40)
        #expect(ints["synchronousWaitLimit"] == 1...4_294_967_295)
        #expect(ints["verifyAfterAccesses"] == 0...Int.max && ints["trialMinimumAccesses"] == 0...Int.max)
        for f in ["trialPairs", "trialSwitchBusyPasses", "verifyWindowAccesses", "verifyLosingWindows", "waitIterationsPerExit", "maximumUndos"] {
            #expect(ints[f] == 1...Int.max, "\(f)")
        }
        #expect(ints.count == 12)
        let numbers = Dictionary(uniqueKeysWithValues: DMPConfiguration.numberLimits.map { ($0.field, $0.allowed) })
        #expect(numbers == ["trialPhaseSeconds": 0...3600, "trialTimeShare": 0.001...1, "trialMinimumRatio": 0...1000,
                            "verifyWindowSeconds": 0...86_400, "verifyCostLimit": 0...1000])
    }

    @Test("the error says which field, what value and what range")
    func descriptions() throws {
        #expect(failure(try with("window", -5))?.description == "DMPConfiguration.window is -5; allowed: 1 to 16777216")
        #expect(failure(try with("maximumUndos", 0))?.description == "DMPConfiguration.maximumUndos is 0; allowed: at least 1")
        #expect(failure(try with("verifyWindowSeconds", Double.infinity))?.description
                == "DMPConfiguration.verifyWindowSeconds is inf; allowed: a finite number from 0.0 to 86400.0")
        #expect(failure(try with("initialBackoff", Int.max))?.field == "initialBackoff")
    }

    @Test("the first setting out of range is reported; two bad settings name the first in the table")
    func firstFailure() {
        var c = DMPConfiguration()
        c.verifyCostLimit = .nan
        c.threshold = 0
        #expect(failure(c) == .integerOutOfRange(field: "threshold", value: 0, allowed: 1...HotspotDetector.maximumWindow))
    }
}

@Suite("DMPMiddleware with an invalid configuration (mock backend)")
struct DMPInvalidConfigurationTests {
    /// A VM whose guest writes port 0x80 from one RIP `count` times, with DMP installed with `c` (threshold 8).
    private func run(_ c: DMPConfiguration, count: Int = 32) throws -> DMPMiddleware {
        let mock = MockHypervisor()
        let vm = try VirtualMachine(backend: mock, configuration: VMConfiguration(memorySize: 32 << 20))
        try vm.bus.attach(DiscardingDevice(), ports: 0x80..<0x81)
        var c = c
        c.threshold = 8
        var logger = Logger(label: "test.dmp.config")
        logger.logLevel = .critical
        let dmp = DMPMiddleware.install(on: vm, rings: nil, configuration: c, logger: logger)
        let exit = VMExit.io(PortIO(port: 0x80, size: 1, direction: .write, value: 0x42))
        try #require(mock.vcpu(0)).script((0..<count).flatMap { _ in [MockStep.jump(to: 0x10_0000), .access(exit, length: 2)] })
        #expect(try vm.run() == .halted)
        return dmp
    }

    @Test("DMP is off, with the error kept and every hot site refused for it; the guest runs on", arguments: [
        ("verifyWindowSeconds", Double.nan), ("verifyWindowSeconds", .infinity), ("verifyWindowSeconds", 1e300),
        ("trialPhaseSeconds", -1), ("verifyCostLimit", -.infinity),
    ])
    func numberOff(field: String, value: Double) throws {
        let dmp = try run(try with(field, value))
        #expect(dmp.configurationError?.field == field)
        let rows = dmp.report()
        #expect(rows.count == 1)
        let reason = try #require(rows.first?.refusal?.description)
        #expect(reason.hasPrefix("plan: invalid configuration: DMPConfiguration.\(field) is "), "\(reason)")
    }

    @Test("huge or negative integer settings turn DMP off the same way (no huge window ring, no overflow later)", arguments: [
        ("window", Int.max), ("window", -1), ("initialBackoff", Int.max), ("initialBackoff", (1 << 40) + 1),
        ("synchronousWaitLimit", Int.max), ("maximumUndos", -3), ("waitIterationsPerExit", 0),
    ])
    func integerOff(field: String, value: Int) throws {
        let dmp = try run(try with(field, value))
        #expect(dmp.configurationError == .integerOutOfRange(field: field, value: value,
                                                             allowed: try #require(DMPConfiguration.integerLimits.first { $0.field == field }).allowed))
        #expect(dmp.report().first?.refusal?.reason.hasPrefix("invalid configuration: DMPConfiguration.\(field) is \(value)") == true)
    }

    @Test("a valid configuration has no configuration error")
    func validOn() throws {
        let dmp = try run(DMPConfiguration(), count: 4)
        #expect(dmp.configurationError == nil)
    }
}
