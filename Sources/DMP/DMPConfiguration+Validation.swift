extension DMPConfiguration {
    /// The allowed range of each integer setting (each property's documentation states it too).
    package static var integerLimits: [(field: String, keyPath: WritableKeyPath<DMPConfiguration, Int>, allowed: ClosedRange<Int>)] {
        [("threshold", \.threshold, 1...HotspotDetector.maximumWindow),
         ("window", \.window, 1...HotspotDetector.maximumWindow),
         ("verifyAfterAccesses", \.verifyAfterAccesses, 0...Int.max),
         ("trialPairs", \.trialPairs, 1...Int.max),
         ("trialMinimumAccesses", \.trialMinimumAccesses, 0...Int.max),
         ("trialSwitchBusyPasses", \.trialSwitchBusyPasses, 1...Int.max),
         ("verifyWindowAccesses", \.verifyWindowAccesses, 1...Int.max),
         ("verifyLosingWindows", \.verifyLosingWindows, 1...Int.max),
         ("waitIterationsPerExit", \.waitIterationsPerExit, 1...Int.max),
         ("synchronousWaitLimit", \.synchronousWaitLimit, 1...Int(UInt32.max)),
         ("initialBackoff", \.initialBackoff, 1...DMPConfiguration.maximumBackoff),
         ("maximumUndos", \.maximumUndos, 1...Int.max)]
    }

    /// The allowed range of each floating-point setting (finite, within the range; each property's documentation
    /// states it too).
    package static var numberLimits: [(field: String, keyPath: WritableKeyPath<DMPConfiguration, Double>, allowed: ClosedRange<Double>)] {
        [("trialPhaseSeconds", \.trialPhaseSeconds, 0...3600),
         ("trialTimeShare", \.trialTimeShare, 0.001...1),
         ("trialMinimumRatio", \.trialMinimumRatio, 0...1000),
         ("verifyWindowSeconds", \.verifyWindowSeconds, 0...86_400),
         ("verifyCostLimit", \.verifyCostLimit, 0...1000)]
    }

    /// The largest ``initialBackoff``: 2^40 exits (doubled at most 20 times, a back-off stays below 2^60).
    public static let maximumBackoff = 1 << 40

    /// Checks every numeric setting against its allowed range (stated in each property's documentation) and
    /// throws for the first one outside it, naming the field, its value and the range. A NaN or infinite
    /// floating-point setting is outside every range.
    ///
    /// ``DMPMiddleware`` validates the configuration it is created with; a VMM that takes settings from its user
    /// calls this first to report a bad one.
    public func validate() throws(DMPConfigurationError) {
        for (field, keyPath, allowed) in DMPConfiguration.integerLimits where !allowed.contains(self[keyPath: keyPath]) {
            throw .integerOutOfRange(field: field, value: self[keyPath: keyPath], allowed: allowed)
        }
        for (field, keyPath, allowed) in DMPConfiguration.numberLimits {
            let value = self[keyPath: keyPath]
            // `contains` is false for NaN; infinities lie outside every finite range.
            guard value.isFinite, allowed.contains(value) else {
                throw .numberOutOfRange(field: field, value: value, allowed: allowed)
            }
        }
    }
}
