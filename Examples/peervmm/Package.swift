// swift-tools-version:6.1
// peervmm: a VMM outside VMMKit's package. It depends on VMMKit by path, as a
// third party would by URL, and uses only VMMKit's and DMP's public API (no
// `package` access, no @testable): its own device (PeerSensor), its own guest
// (Guest/), DMP on through DMPMiddleware.install.
import PackageDescription

let package = Package(
    name: "peervmm",
    dependencies: [
        // `name:` fixes the package's identity: a path dependency is otherwise known by its folder's name
        // (a worktree or a CI clone of VMMKit may be called anything).
        .package(name: "VMMKit", path: "../.."),
    ],
    targets: [
        // The device: a plain BusDevice that knows nothing about KVM or DMP.
        .target(name: "PeerSensor", dependencies: [.product(name: "VMMKit", package: "VMMKit")]),
        .executableTarget(
            name: "peervmm",
            dependencies: [
                "PeerSensor",
                .product(name: "VMMKit", package: "VMMKit"),
                .product(name: "DMP", package: "VMMKit"),
            ]
        ),
        .testTarget(
            name: "PeerSensorTests",
            dependencies: [
                "PeerSensor",
                .product(name: "VMMKit", package: "VMMKit"),
                .product(name: "VMMKitTesting", package: "VMMKit"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
