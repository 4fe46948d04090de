import ArgumentParser
import BridgeCore
import Foundation

@main
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-bench",
        abstract: "Benchmarks for vhost-pci-bridge. Each reports ratios against a baseline measured in the same run.",
        version: BuildInfo.version,
        subcommands: [LookupBench.self, EngineBench.self, NotifyBench.self, IOTLBBench.self, DPDKBench.self, LinuxGuestBench.self, MigrateBench.self, ScaleBench.self, SoakBench.self]
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
    _ = FileManager.default.createFile(atPath: log, contents: nil)
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

/// Voluntary context switches of every thread of this process so far, by
/// thread name (/proc/self/task/*/status): each is a thread blocking so that
/// another can run. Counted around N round trips they give the thread
/// hand-offs one round trip costs, a figure the machine's load does not move
/// (involuntary switches, which load does move, are left out).
func voluntarySwitchesByThread() -> [String: Int] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    var byName: [String: Int] = [:]
    for task in tasks {
        guard let status = try? String(contentsOfFile: "/proc/self/task/\(task)/status", encoding: .utf8) else { continue }
        var name = "?", count = 0
        for line in status.split(separator: "\n") {
            if line.hasPrefix("Name:") { name = line.dropFirst(5).trimmingCharacters(in: .whitespaces) }
            if line.hasPrefix("voluntary_ctxt_switches:") { count = Int(line.split(separator: "\t").last ?? "") ?? 0 }
        }
        byName[name, default: 0] += count
    }
    return byName
}
