import Foundation
import LinuxIO

/// QMP, QEMU's JSON control protocol, on a Unix socket: one command at a
/// time, events skipped, every read bounded.
public final class QMPClient {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    private let socket: UnixSocket
    private var buffer: [UInt8] = []
    private let timeout: Duration

    /// Connects (QEMU creates the socket as it starts: retried until
    /// `timeout`), reads the greeting and leaves capabilities negotiation.
    public init(path: String, timeout: Duration = .seconds(30)) throws {
        let end = ContinuousClock.now.advanced(by: timeout)
        var connected: UnixSocket?
        while connected == nil {
            do { connected = try UnixSocket.connect(path: path) } catch {
                if ContinuousClock.now >= end { throw Failure(description: "QMP socket \(path): \(error)") }
                usleep(50_000)
            }
        }
        socket = connected.unsafelyUnwrapped
        self.timeout = timeout
        _ = try object() // the greeting
        _ = try execute("qmp_capabilities")
    }

    deinit { try? socket.fd.close() }

    /// Runs `command` with `arguments`; its `return` value, or the error QEMU gave.
    @discardableResult
    public func execute(_ command: String, _ arguments: [String: Any] = [:]) throws -> Any {
        var request: [String: Any] = ["execute": command]
        if !arguments.isEmpty { request["arguments"] = arguments }
        let data = try JSONSerialization.data(withJSONObject: request)
        try socket.send(Array(data) + [10])
        while true {
            let reply = try object()
            if reply["event"] != nil { continue }
            if let error = reply["error"] as? [String: Any] {
                throw Failure(description: "\(command): \(error["desc"] as? String ?? "\(error)")")
            }
            return reply["return"] ?? [:]
        }
    }

    /// The next JSON object QEMU sends.
    private func object() throws -> [String: Any] {
        let end = ContinuousClock.now.advanced(by: timeout)
        while true {
            if let newline = buffer.firstIndex(of: 10) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                guard let object = try JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else {
                    throw Failure(description: "QMP sent something that is not an object")
                }
                return object
            }
            let m = try socket.receive(maxBytes: 65536, maxFDs: 0, deadline: end)
            if m.bytes.isEmpty { throw Failure(description: "QEMU closed its QMP socket") }
            buffer += m.bytes
        }
    }
}

/// A child process (QEMU, testpmd) whose output goes to a file; killed
/// when this goes away (and the file removed, unless `keepsLog`).
public final class GuestProcess {
    public let process = Process()
    public let logPath: String
    private let stdin = Pipe()
    private let keepsLog: Bool

    public init(_ executable: String, _ arguments: [String], log: String, keepsLog: Bool = true) throws {
        logPath = log
        self.keepsLog = keepsLog
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = stdin
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
    }

    public var output: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    public var isRunning: Bool { process.isRunning }

    /// Writes `text` to the process's stdin (testpmd's command line with `-i`).
    public func send(_ text: String) {
        try? stdin.fileHandleForWriting.write(contentsOf: Array(text.utf8))
    }

    /// EOF on stdin (testpmd then prints its statistics and exits), up to
    /// 5 s, then SIGTERM.
    public func finish() {
        try? stdin.fileHandleForWriting.close()
        for _ in 0..<100 where process.isRunning { usleep(50_000) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }

    /// SIGTERM, then the exit (SIGKILL after 10 s); returns the exit status.
    @discardableResult
    public func terminate() -> Int32 {
        if process.isRunning { process.terminate() }
        for _ in 0..<200 where process.isRunning { usleep(50_000) }
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    public func kill() {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit {
        kill()
        if !keepsLog { try? FileManager.default.removeItem(atPath: logPath) }
    }
}

extension LinuxGuest {
    /// A live migration of the guest from one vhost-user back end to
    /// another: the guest sends its datagrams and checks every one that
    /// comes back (`vpb.mode=both`) for `seconds`; after `migrateAfter`
    /// seconds of traffic QEMU migrates it (QMP `migrate`) to a second QEMU
    /// started with `-incoming`, on the other back end.
    public struct Migration {
        public var iommu: Bool
        public var seconds: Double = 20
        public var migrateAfter: Double = 5
        public var size = 512
        public var qemu = "/usr/bin/qemu-system-x86_64"
        public init(iommu: Bool) { self.iommu = iommu }

        /// What QEMU and the guest said.
        public struct Outcome: Sendable, Codable, Equatable {
            /// `query-migrate`'s status: "completed" when it worked.
            public var status: String
            public var totalTimeMilliseconds: Double
            public var downtimeMilliseconds: Double
            public var setupTimeMilliseconds: Double
            public var ramTransferredBytes: Double
            /// The destination QEMU runs the guest.
            public var destinationRunning: Bool
            /// The guest's report, printed on the destination's console.
            public var guest: Report?
        }

        /// Migrates from `source` to `destination` (vhost-user socket
        /// paths), with files in `directory`. Throws when QEMU fails to start
        /// or the migration does not end; a migration that failed is an
        /// outcome (its status says so).
        public func run(source: String, destination: String, directory: String) throws -> Outcome {
            let migration = "\(directory)/migration.sock"
            let destinationQEMU = try GuestProcess(qemu, arguments(socket: destination, qmp: "\(directory)/qmp-b.sock", incoming: "unix:\(migration)"),
                                                   log: "\(directory)/qemu-b.log")
            defer { destinationQEMU.kill() }
            let sourceQEMU = try GuestProcess(qemu, arguments(socket: source, qmp: "\(directory)/qmp-a.sock"), log: "\(directory)/qemu-a.log")
            defer { sourceQEMU.kill() }
            // Traffic runs once the guest's receiver is up.
            let started = ContinuousClock.now.advanced(by: .seconds(120))
            while !sourceQEMU.output.contains("vpb-receiving on") {
                guard sourceQEMU.isRunning, ContinuousClock.now < started else {
                    throw QMPClient.Failure(description: "the guest did not start its traffic: \(sourceQEMU.output.suffix(800))")
                }
                usleep(50_000)
            }
            usleep(UInt32(migrateAfter * 1_000_000))
            let a = try QMPClient(path: "\(directory)/qmp-a.sock")
            let b = try QMPClient(path: "\(directory)/qmp-b.sock")
            // QEMU 7.2 moves 32 MiB/s by default: a guest of 256 MiB would take seconds.
            try a.execute("migrate-set-parameters", ["max-bandwidth": 1 << 30, "downtime-limit": 300])
            try a.execute("migrate", ["uri": "unix:\(migration)"])
            var info: [String: Any] = [:]
            let migrated = ContinuousClock.now.advanced(by: .seconds(120))
            while ContinuousClock.now < migrated {
                info = try a.execute("query-migrate") as? [String: Any] ?? [:]
                if let s = info["status"] as? String, ["completed", "failed", "cancelled"].contains(s) { break }
                usleep(50_000)
            }
            // QEMU sets the status before the times: ask again.
            usleep(500_000)
            info = try a.execute("query-migrate") as? [String: Any] ?? info
            let status = info["status"] as? String ?? "unknown"
            let ram = info["ram"] as? [String: Any] ?? [:]
            func number(_ v: Any?) -> Double { (v as? NSNumber)?.doubleValue ?? 0 }
            let running = ((try? b.execute("query-status")) as? [String: Any])?["status"] as? String == "running"
            _ = try? a.execute("quit")
            var report: Report?
            if status == "completed" {
                let done = ContinuousClock.now.advanced(by: .seconds(seconds + 120))
                while ContinuousClock.now < done, destinationQEMU.isRunning {
                    if let r = LinuxGuest.report(in: destinationQEMU.output) { report = r; break }
                    usleep(100_000)
                }
                if report == nil { report = LinuxGuest.report(in: destinationQEMU.output) }
            }
            return Outcome(status: status, totalTimeMilliseconds: number(info["total-time"]), downtimeMilliseconds: number(info["downtime"]),
                           setupTimeMilliseconds: number(info["setup-time"]), ramTransferredBytes: number(ram["transferred"]),
                           destinationRunning: running, guest: report)
        }

        /// The guest's QEMU line for one side.
        func arguments(socket: String, qmp: String, incoming: String? = nil) -> [String] {
            var args = LinuxGuest.qemuArguments(socket: socket, iommu: iommu, count: 0, size: size, seconds: seconds, mode: .both)
            args += ["-qmp", "unix:\(qmp),server=on,wait=off"]
            if let incoming { args += ["-incoming", incoming] }
            return args
        }
    }

    /// A datagram of the guest's sent back to it (`GuestDatagram.reflected`).
    public static func reflected(_ frame: UnsafeRawBufferPointer) -> [UInt8]? { GuestDatagram.reflected(frame) }
}
