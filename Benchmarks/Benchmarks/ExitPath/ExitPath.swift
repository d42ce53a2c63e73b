// Allocation and time benchmarks of VMMKit's exit path on real KVM.
//
// Each benchmark boots the uart-cpl0 workload guest with a given iteration
// count and runs it to its exit. The malloc count of a run is set-up plus
// per-exit work; comparing two iteration counts (13,681 more exits between
// them) shows the per-exit path allocates nothing when the counts are equal.
import Benchmark
import VMMKit
#if canImport(Glibc)
import Glibc
#endif

let guests: String = {
    var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(4) // Benchmarks/Benchmarks/ExitPath/ExitPath.swift
    return parts.joined(separator: "/") + "/Guests"
}()

func load(_ name: String) -> [UInt8] {
    (try? ImageFile.read(guests + "/" + name + ".elf")) ?? []
}

func runGuest(_ image: [UInt8], _ commandLine: String) throws -> Int {
    let vm = try VirtualMachine(backend: try KVMSystem(), configuration: VMConfiguration(memorySize: 64 << 20))
    try StandardDevices.install(on: vm, console: OutputSink { _ in })
    _ = try X86Boot.load(.elf(image), commandLine: commandLine, into: vm)
    guard case .guestExit(0) = try vm.run() else { return -1 }
    return vm.statistics().total
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .mallocCountTotal, .syscalls], maxDuration: .seconds(10), maxIterations: 10)
    let image = load("uart-cpl0")
    for iters in [20, 200] {
        Benchmark("uart-cpl0 iters=\(iters) (boot + run)") { benchmark in
            for _ in benchmark.scaledIterations {
                blackHole(try runGuest(image, "iters=\(iters)"))
            }
        }
    }
}
