// swift-tools-version:6.1
import PackageDescription

// Layering (docs/architecture.md has the table, DESIGN §8):
//   CLinuxShim     - C: liburing and every macro / inline Swift cannot import. Nothing else.
//   CYAML          - the system's libyaml (libyaml-dev), for the config file's parser.
//   BridgeCore     - pure Swift, imports nothing: addresses, regions, AddressSpace, decisions, wire format.
//   VhostUser      - pure: vhost-user codec + BackendSession (imports BridgeCore).
//   PeerProtocol   - pure: the VM2 peer protocol codec (imports BridgeCore).
//   ControlWire    - the control socket's Codable requests and results (imports BridgeCore).
//   LinuxIO        - the only target that makes syscalls; executes BridgeCore's plans.
//   DeviceEngine   - VM2's data plane: virtqueues served in bursts from the BAR (imports BridgeCore, LinuxIO).
//   BridgeDaemon   - carries out the pure decisions: threads, sockets, fds (imports all of the above).
//   EmulatedGuests - emulated VM1 and VM2 for tests, the demo and the benchmarks.
//   FaultInjection - (Tests/) fault injectors for the fault scenarios: VMAs to the limit, io_uring refused.
//   executables    - thin: argument parsing and printing (bench also holds its baselines).
let swiftSettings: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
]

let package = Package(
    name: "vhost-pci-bridge",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "BridgeCore", targets: ["BridgeCore"]),
        .library(name: "VhostUser", targets: ["VhostUser"]),
        .library(name: "LinuxIO", targets: ["LinuxIO"]),
        .library(name: "DeviceEngine", targets: ["DeviceEngine"]),
        // libvhost-pci-device: VM2's device for C data planes (vhost_pci_device.h).
        .library(name: "vhost-pci-device", type: .dynamic, targets: ["VhostPCIDevice"]),
        .executable(name: "vhost-pci-bridged", targets: ["vhost-pci-bridged"]),
        .executable(name: "vhost-pci-guest", targets: ["vhost-pci-guest"]),
        .executable(name: "vhost-pci-bridgectl", targets: ["vhost-pci-bridgectl"]),
        .executable(name: "vhost-pci-bench", targets: ["vhost-pci-bench"]),
        .executable(name: "vhost-pci-demo", targets: ["vhost-pci-demo"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        .target(
            name: "CLinuxShim",
            linkerSettings: [.linkedLibrary("uring")]
        ),
        // libyaml's event parser; BridgeDaemon composes the config from its
        // events (DaemonConfig+YAML.swift). Linked dynamically: the package
        // depends on libyaml-0-2.
        .systemLibrary(
            name: "CYAML",
            pkgConfig: "yaml-0.1",
            providers: [.apt(["libyaml-dev"])]
        ),
        .target(
            name: "BridgeCore",
            swiftSettings: swiftSettings
        ),
        .target(
            name: "VhostUser",
            dependencies: ["BridgeCore"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "PeerProtocol",
            dependencies: ["BridgeCore"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ControlWire",
            dependencies: ["BridgeCore"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "LinuxIO",
            dependencies: [
                "CLinuxShim",
                "BridgeCore",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "BridgeDaemon",
            dependencies: [
                "BridgeCore", "VhostUser", "PeerProtocol", "LinuxIO", "ControlWire", "CYAML",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "DeviceEngine",
            dependencies: ["BridgeCore", "LinuxIO"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "PeerDevice",
            dependencies: ["BridgeCore", "PeerProtocol", "LinuxIO", "DeviceEngine"],
            swiftSettings: swiftSettings
        ),
        .target(name: "CVhostPCIDevice"),
        .target(
            name: "VhostPCIDevice",
            dependencies: ["CVhostPCIDevice", "PeerDevice", "DeviceEngine", "BridgeCore"],
            swiftSettings: swiftSettings,
            // The ABI major (VPD_ABI_VERSION) in the shared library's name.
            linkerSettings: [.unsafeFlags(["-Xlinker", "-soname=libvhost-pci-device.so.1"])]
        ),
        .target(
            name: "EmulatedGuests",
            dependencies: ["BridgeCore", "VhostUser", "PeerProtocol", "LinuxIO", "DeviceEngine", "PeerDevice"],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "vhost-pci-bridged",
            dependencies: [
                "BridgeDaemon", "BridgeCore", "VhostUser", "LinuxIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "ControlClient",
            dependencies: ["LinuxIO", "ControlWire"],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "vhost-pci-bridgectl",
            dependencies: [
                "BridgeCore",
                "ControlClient",
                "LinuxIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "vhost-pci-guest",
            dependencies: [
                "EmulatedGuests", "BridgeCore", "LinuxIO", "DeviceEngine", "FaultInjection",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "vhost-pci-bench",
            dependencies: [
                "BridgeCore", "BridgeDaemon", "LinuxIO", "EmulatedGuests", "VhostUser", "DeviceEngine", "ControlClient",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "vhost-pci-demo",
            dependencies: [
                "BridgeCore",
                "LinuxIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "TestSupport",
            dependencies: [.product(name: "Logging", package: "swift-log")],
            path: "Tests/TestSupport",
            swiftSettings: swiftSettings
        ),
        // Fault injectors (MapCountFiller, Seccomp) for the fault scenarios
        // vhost-pci-guest runs in processes of their own; not in LinuxIO,
        // so nothing the daemon links can reach them.
        .target(
            name: "FaultInjection",
            dependencies: ["LinuxIO", "CLinuxShim", .product(name: "SystemPackage", package: "swift-system")],
            path: "Tests/FaultInjection",
            swiftSettings: swiftSettings
        ),
        .target(
            name: "DaemonTestSupport",
            dependencies: ["BridgeDaemon", "ControlClient", "LinuxIO", "TestSupport", .product(name: "Logging", package: "swift-log")],
            path: "Tests/DaemonTestSupport",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "BridgeCoreTests",
            dependencies: ["BridgeCore", "TestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "PeerProtocolTests",
            dependencies: ["PeerProtocol", "BridgeCore", "TestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "VhostUserTests",
            dependencies: ["VhostUser", "BridgeCore", "TestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "BridgeDaemonTests",
            dependencies: ["BridgeDaemon", "LinuxIO", "BridgeCore", "ControlClient", "VhostUser", "TestSupport", "DaemonTestSupport",
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["BridgeDaemon", "EmulatedGuests", "DeviceEngine", "VhostUser", "PeerProtocol", "LinuxIO", "BridgeCore", "TestSupport",
                           "DaemonTestSupport", "ControlClient", "CVhostPCIDevice", "VhostPCIDevice",
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "InteropTests",
            dependencies: ["BridgeDaemon", "EmulatedGuests", "DeviceEngine", "VhostUser", "LinuxIO", "BridgeCore", "TestSupport",
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "DeviceEngineTests",
            dependencies: ["DeviceEngine", "LinuxIO", "BridgeCore", "TestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "LinuxIOTests",
            dependencies: ["LinuxIO", "BridgeCore", "CLinuxShim", "TestSupport",
                           .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: swiftSettings
        ),
    ]
)

// Coverage-guided fuzz targets (libFuzzer), only when VPB_FUZZ=1: `make fuzz`
// builds them with -sanitize=fuzzer,address in .build-fuzz. Each is an
// executable whose main comes from libFuzzer (docs/testing.md).
if Context.environment["VPB_FUZZ"] == "1" {
    package.targets.append(.target(name: "FuzzSupport", path: "Fuzz/Support", swiftSettings: swiftSettings))
    let fuzzTargets: [(String, [Target.Dependency])] = [
        ("fuzz-vhost-user", ["VhostUser", "BridgeCore"]),
        ("fuzz-peer", ["PeerProtocol", "BridgeCore"]),
        ("fuzz-address-space", ["BridgeCore"]),
        ("fuzz-config", ["BridgeDaemon"]),
        ("fuzz-control", ["BridgeDaemon", "BridgeCore", .product(name: "Logging", package: "swift-log")]),
    ]
    for (name, dependencies) in fuzzTargets {
        package.targets.append(.executableTarget(
            name: name, dependencies: dependencies + ["FuzzSupport"],
            path: "Fuzz/\(name.dropFirst("fuzz-".count))",
            swiftSettings: swiftSettings
        ))
        package.products.append(.executable(name: name, targets: [name]))
    }
}
