import ArgumentParser
import BridgeCore
import Foundation

@main
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-bench",
        abstract: "Benchmarks for vhost-pci-bridge. Each reports ratios against a baseline measured in the same run.",
        version: BuildInfo.version,
        subcommands: [LookupBench.self, NotifyBench.self, IOTLBBench.self, DPDKBench.self, LinuxGuestBench.self, ScaleBench.self, SoakBench.self]
    )
}

/// One JSON object on stdout (keys sorted): what `--json` prints.
func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}

/// A child process (testpmd, QEMU, the daemon) writing to `log`, with a
/// stdin pipe kept open (testpmd exits on EOF).
func launchChild(_ executable: String, _ args: [String], log: String) throws -> (Process, Pipe) {
    let p = Process()
    let stdin = Pipe()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    p.standardInput = stdin
    FileManager.default.createFile(atPath: log, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
    p.standardOutput = h
    p.standardError = h
    try p.run()
    return (p, stdin)
}

/// EOF on stdin, up to 5 s to exit, then SIGTERM.
func finishChild(_ p: Process, _ stdin: Pipe) {
    try? stdin.fileHandleForWriting.close()
    for _ in 0..<100 where p.isRunning { usleep(50_000) }
    if p.isRunning { p.terminate() }
    p.waitUntilExit()
}

/// A `KiB` field of /proc/PID/status (VmRSS, RssAnon…); -1 when missing.
func procStatusKiB(_ pid: Int32, _ field: String) -> Int {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    return status.split(separator: "\n").first { $0.hasPrefix(field) }
        .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") } ?? -1
}
