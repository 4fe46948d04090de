import ArgumentParser
import BridgeCore

@main
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-bench",
        abstract: "Benchmarks for vhost-pci-bridge. Each reports ratios against a baseline measured in the same run.",
        subcommands: [LookupBench.self, NotifyBench.self, IOTLBBench.self, DPDKBench.self, LinuxGuestBench.self, ScaleBench.self]
    )
}
