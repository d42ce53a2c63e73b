// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "VMMKit",
    products: [
        .library(name: "VMMKit", targets: ["VMMKit"]),
        .library(name: "VMMKitTesting", targets: ["VMMKitTesting"]),
        .library(name: "X86Disassembler", targets: ["X86Disassembler"]),
        .library(name: "DMP", targets: ["DMP"]),
        .executable(name: "minivmm", targets: ["minivmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .target(name: "CKVM"),
        .systemLibrary(
            name: "CCapstone",
            pkgConfig: "capstone",
            providers: [.apt(["libcapstone-dev"])]
        ),
        .target(name: "VMMKit", dependencies: ["CKVM"]),
        .target(name: "VMMKitTesting", dependencies: ["VMMKit"]),
        .target(name: "X86Disassembler", dependencies: ["CCapstone", "VMMKit"]),
        // Dynamic Memory Paravirtualization: opt-in middleware over the core (the core never imports it).
        .target(
            name: "DMP",
            dependencies: ["VMMKit", "X86Disassembler", .product(name: "Logging", package: "swift-log")]
        ),
        .executableTarget(
            name: "minivmm",
            dependencies: [
                "VMMKit", "X86Disassembler", "DMP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Examples/minivmm",
            // The demo guest, compiled into the executable (see DemoGuest.swift).
            resources: [.embedInCode("Resources/hello.elf")]
        ),
        .executableTarget(name: "tinyvmm", dependencies: ["VMMKit"], path: "Examples/tinyvmm"),
        .testTarget(name: "VMMKitTests", dependencies: ["VMMKit", "VMMKitTesting"]),
        .testTarget(name: "KVMTests", dependencies: ["VMMKit", "X86Disassembler", "DMP", "minivmm"]),
        .testTarget(name: "DMPTests", dependencies: ["DMP", "VMMKit", "VMMKitTesting", "X86Disassembler"], exclude: ["Fixtures"]),
        .testTarget(name: "MiniVMMTests", dependencies: ["minivmm"]),
        .testTarget(name: "X86DisassemblerTests", dependencies: ["X86Disassembler", "VMMKit"], exclude: ["Corpus"]),
    ],
    swiftLanguageModes: [.v6]
)
