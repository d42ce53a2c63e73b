// swift-tools-version:6.1
// Benchmarks for VMMKit, kept out of the main package so `swift test` never builds them.
// Run: cd Benchmarks && swift package benchmark
import PackageDescription

let package = Package(
    name: "VMMKitBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "VMMKit", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "ExitPath",
            dependencies: [
                .product(name: "VMMKit", package: "VMMKit"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/ExitPath",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .executableTarget(
            name: "Ring",
            dependencies: [
                .product(name: "VMMKit", package: "VMMKit"),
                .product(name: "VMMKitTesting", package: "VMMKit"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/Ring",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
