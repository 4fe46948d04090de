import BridgeDaemon
import ControlClient
import DaemonTestSupport
import Foundation
import LinuxIO
import Logging
import Testing
import TestSupport

/// A fake systemd: a datagram socket that records what is sent to NOTIFY_SOCKET.
final class FakeNotifySocket {
    let path: String
    let socket: UnixSocket
    init() throws {
        path = "/tmp/vpb-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        socket = try UnixSocket.listen(path: path, kind: .datagram)
    }
    /// Every datagram received within ~`seconds` until `until` matches.
    func collect(seconds: Int = 20, until: ([String]) -> Bool) -> [String] {
        var got: [String] = []
        for _ in 0..<(seconds * 100) {
            if let ready = try? Poll.readable([socket.fd.rawValue], timeoutMilliseconds: 10), ready[0],
               let m = try? socket.receive(maxBytes: 4096, maxFDs: 0) {
                got.append(String(decoding: m.bytes, as: UTF8.self))
                if until(got) { break }
            }
        }
        return got
    }
    deinit { unlink(path) }
}

@Suite(.serialized) struct SystemdTests {
    @Test func notifierSendsStateLinesAndIsSilentWithoutSystemd() throws {
        let fake = try FakeNotifySocket()
        let n = SystemdNotifier(environment: ["NOTIFY_SOCKET": fake.path])
        #expect(n.isActive)
        #expect(n.notify("READY=1", "STATUS=up"))
        #expect(n.notify("WATCHDOG=1"))
        #expect(n.notify("STOPPING=1"))
        #expect(fake.collect { $0.count == 3 } == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"])
        let none = SystemdNotifier(environment: [:])
        #expect(!none.isActive && !none.notify("READY=1"))
        #expect(SystemdNotifier.watchdogMicroseconds(environment: ["WATCHDOG_USEC": "2000000"]) == 2_000_000)
        #expect(SystemdNotifier.watchdogMicroseconds(environment: ["WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"]) == nil)
        #expect(SystemdNotifier.watchdogMicroseconds(environment: ["WATCHDOG_USEC": "0"]) == nil)
    }

    /// The daemon process under a fake systemd: READY after its sockets
    /// listen, WATCHDOG pings, RELOADING then READY on SIGHUP, STOPPING on SIGTERM.
    @Test func theDaemonSpeaksTypeNotify() throws {
        let binary = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/debug/vhost-pci-bridged").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "build the daemon first (make test does)")
        let fake = try FakeNotifySocket()
        let dir = "/tmp/vpb-sd-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config.yaml"
        try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nbridges:\n  - name: sd\n    bar-size: 1G\n"
            .write(toFile: config, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["--config", config, "--log-level", "warning"]
        p.environment = ["NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": "200000"]
        try p.run()
        defer { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        let ready = fake.collect { $0.contains { $0.hasPrefix("READY=1") } }
        #expect(ready.last?.hasPrefix("READY=1") == true, "\(ready)")
        #expect(ready.last?.contains("STATUS=1 bridge(s), 0 VM1 session(s), 0 VM2(s) connected") == true, "\(ready)")
        // The sockets were listening before READY.
        #expect(FileManager.default.fileExists(atPath: "\(dir)/sd-vm1.sock") && FileManager.default.fileExists(atPath: "\(dir)/control.sock"))
        #expect(fake.collect { $0.contains("WATCHDOG=1") }.contains("WATCHDOG=1"))
        kill(p.processIdentifier, SIGHUP)
        let reload = fake.collect { $0.contains { $0.hasPrefix("READY=1") } }.filter { !$0.hasPrefix("WATCHDOG") && !$0.hasPrefix("STATUS=") }
        #expect(reload.first?.hasPrefix("RELOADING=1") == true && reload.last?.hasPrefix("READY=1") == true, "\(reload)")
        // A broken file: `vhost-pci-bridgectl reload` (the unit's ExecReload)
        // fails naming the key, the daemon keeps its bridge, and STATUS= and
        // `status` carry the refusal as the last error.
        try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nbridges:\n  - name: sd\n    bar-size: 3G\n"
            .write(toFile: config, atomically: true, encoding: .utf8)
        let ctl = Process()
        ctl.executableURL = URL(fileURLWithPath: binary).deletingLastPathComponent().appendingPathComponent("vhost-pci-bridgectl")
        ctl.arguments = ["reload", "--socket", "\(dir)/control.sock"]
        let ctlError = Pipe()
        ctl.standardError = ctlError
        ctl.standardOutput = FileHandle.nullDevice
        try ctl.run()
        let ctlText = String(decoding: ctlError.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        ctl.waitUntilExit()
        #expect(ctl.terminationStatus == 1, "a refused reload fails systemctl reload")
        #expect(ctlText.contains("bridges[0].bar-size"), "\(ctlText)")
        let refused = fake.collect { $0.contains { $0.hasPrefix("READY=1") } }.filter { !$0.hasPrefix("WATCHDOG") && !$0.hasPrefix("STATUS=") }
        #expect(refused.first?.hasPrefix("RELOADING=1") == true, "\(refused)")
        #expect(refused.last?.contains("last error: reload refused") == true && refused.last?.contains("1 bridge(s)") == true, "\(refused)")
        let status = try ControlClient(path: "\(dir)/control.sock").call(["command": "status"])["result"] as? [String: Any]
        #expect((status?["lastError"] as? String)?.contains("bar-size") == true, "\(String(describing: status))")
        kill(p.processIdentifier, SIGTERM)
        let stop = fake.collect { $0.contains { $0.hasPrefix("STOPPING=1") } }.filter { !$0.hasPrefix("WATCHDOG") }
        #expect(stop.last?.hasPrefix("STOPPING=1") == true, "\(stop)")
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/control.sock"), "sockets removed on exit")
    }
}

@Suite struct JournalFormatTests {
    @Test func underSystemdLinesCarryTheSyslogPriority() {
        var h = JournalLogHandler(label: "vhost-pci-bridged", journald: true)
        h[metadataKey: "bridge"] = "net0"
        #expect(h.line(level: .warning, message: "refused SET_VRING_NUM", metadata: ["rule": "queue-size"])
                == "<4>bridge=net0 rule=queue-size refused SET_VRING_NUM\n")
        #expect(h.line(level: .error, message: "x", metadata: nil).hasPrefix("<3>"))
        #expect(h.line(level: .debug, message: "x", metadata: nil).hasPrefix("<7>"))
        #expect(h.line(level: .notice, message: "x", metadata: nil).hasPrefix("<5>"))
        let plain = JournalLogHandler(label: "vhost-pci-bridged", journald: false)
        let text = plain.line(level: .info, message: "ready", metadata: nil, date: Date(timeIntervalSince1970: 0))
        #expect(text == "1970-01-01T00:00:00Z info vhost-pci-bridged: ready\n")
        // To the second, rounded down (as the ISO 8601 style did).
        #expect(plain.line(level: .info, message: "x", metadata: nil, date: Date(timeIntervalSince1970: 1_796_653_419.9))
                == "2026-12-07T14:23:39Z info vhost-pci-bridged: x\n")
    }

    /// The native journal protocol: structured fields (BRIDGE=, RULE=,
    /// PEER=) to a journald socket, a multi-line message in the binary form,
    /// and nothing to stderr when the journal took the entry.
    @Test func entriesGoToTheJournalSocketWithStructuredFields() throws {
        let journald = try FakeNotifySocket() // a datagram listener, like journald's socket
        let journal = try #require(JournalSocket.available(path: journald.path))
        var h = JournalLogHandler(label: "bridge", journald: true, journal: journal)
        h[metadataKey: "bridge"] = "net0"
        h[metadataKey: "peer"] = "vm1 pid 7 uid 0"
        h.log(event: LogEvent(level: .warning, message: "refused IOTLB_MSG", metadata: ["rule": "iotlb-permission", "_hidden": "x", "9lives": "y"],
                              source: "t", file: #fileID, function: #function, line: #line))
        let got = journald.collect { $0.count == 1 }
        let fields = Dictionary(uniqueKeysWithValues: (got.first ?? "").split(separator: "\n").compactMap { line -> (String, String)? in
            guard let eq = line.firstIndex(of: "=") else { return nil }
            return (String(line[..<eq]), String(line[line.index(after: eq)...]))
        })
        #expect(fields["MESSAGE"] == "refused IOTLB_MSG" && fields["PRIORITY"] == "4" && fields["SYSLOG_IDENTIFIER"] == "vhost-pci-bridged")
        #expect(fields["BRIDGE"] == "net0" && fields["RULE"] == "iotlb-permission" && fields["PEER"] == "vm1 pid 7 uid 0", "\(fields)")
        #expect(fields["HIDDEN"] == "x" && fields["LIVES"] == "y", "no trusted (_) or digit-led field names: \(fields)")
        // A value with a newline: name, newline, 64-bit little-endian length, bytes, newline.
        let bytes = h.entry(level: .error, message: "two\nlines", metadata: nil)
        let expected: [UInt8] = Array("MESSAGE\n".utf8) + [9, 0, 0, 0, 0, 0, 0, 0] + Array("two\nlines\n".utf8)
        #expect(Array(bytes.prefix(expected.count)) == expected)
        #expect(JournalSocket.available(path: "/nonexistent/socket") == nil)
        // JOURNAL_STREAM counts only when it names stderr itself.
        var st = stat()
        #expect(fstat(2, &st) == 0)
        #expect(JournalSocket.stderrIsJournal("\(st.st_dev):\(st.st_ino)"))
        #expect(!JournalSocket.stderrIsJournal("\(st.st_dev):\(st.st_ino + 1)"))
        #expect(!JournalSocket.stderrIsJournal("8:12345") && !JournalSocket.stderrIsJournal(nil) && !JournalSocket.stderrIsJournal("junk"))
        #expect(JournalSocket.available(path: "/etc/hostname") == nil, "a file is not a journal")
    }

    static var daemonBinary: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/debug/vhost-pci-bridged").path
    }

    /// The back-end program conventions: `--print-capabilities` prints one
    /// JSON object naming the device type and exits 0, without a socket.
    @Test func printCapabilitiesIsOneJSONObject() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.daemonBinary)
        p.arguments = ["--print-capabilities"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        p.waitUntilExit()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        #expect(p.terminationStatus == 0)
        #expect(p.terminationStatus == 0)
        // QEMU's vhost-user.json defines no capability list for `net`: the
        // type alone, the same as the installed discovery file's.
        #expect(object?.keys.sorted() == ["type"] && object?["type"] as? String == "net", "\(String(describing: object))")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let discovery = try JSONSerialization.jsonObject(with: Data(contentsOf: root.appendingPathComponent("packaging/qemu/50-vhost-pci-bridged.json"))) as? [String: Any]
        #expect(discovery?["type"] as? String == object?["type"] as? String)
        #expect((discovery?["binary"] as? String)?.hasSuffix("/bin/vhost-pci-bridged") == true)
        #expect(discovery?["description"] is String)
    }

    /// SIGINT (Ctrl-C by hand) stops the daemon like SIGTERM: exit 0, its
    /// sockets removed.
    @Test func sigintStopsTheDaemonCleanly() throws {
        let dir = "/tmp/vpb-int-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config.yaml"
        try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nbridges:\n  - name: i\n    bar-size: 1G\n"
            .write(toFile: config, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.daemonBinary)
        p.arguments = ["--config", config, "--log-level", "error"]
        try p.run()
        defer { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        #expect(pollUntil { FileManager.default.fileExists(atPath: "\(dir)/i-vm1.sock") })
        kill(p.processIdentifier, SIGINT)
        p.waitUntilExit()
        #expect(p.terminationReason == .exit && p.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/i-vm1.sock") && !FileManager.default.fileExists(atPath: "\(dir)/control.sock"))
    }

    /// A reload with a broken config file — including the two texts that
    /// crashed the daemon inside Yams before (found by fuzz-config) — is
    /// refused and reported, by SIGHUP and by `reload` on the control socket;
    /// the daemon keeps running its old bridges.
    @Test func aBrokenConfigOnReloadKeepsTheRunningOne() throws {
        let dir = "/tmp/vpb-badreload-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config.yaml"
        try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nbridges:\n  - name: keep\n    bar-size: 1G\n"
            .write(toFile: config, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.daemonBinary)
        p.arguments = ["--config", config, "--log-level", "critical"]
        try p.run()
        defer { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        #expect(pollUntil { FileManager.default.fileExists(atPath: "\(dir)/control.sock") })
        for broken in ["{{}}", "bridges:\n  - name: x\n    bar-size: 1G\n    busy-poll-us: 3333333333333333333:3\n", "bridges: [", "log-level: loud\n"] {
            try broken.write(toFile: config, atomically: true, encoding: .utf8)
            kill(p.processIdentifier, SIGHUP)
            let answer = try ControlClient(path: "\(dir)/control.sock").call(["command": "reload"])
            #expect(answer["ok"] as? Bool == false)
            #expect((answer["error"] as? [String: Any])?["code"] as? String == "invalid-config", "\(answer)")
            #expect(p.isRunning, "the daemon survived \(broken.debugDescription)")
            let list = try ControlClient(path: "\(dir)/control.sock").call(["command": "list"])
            #expect("\(list)".contains("keep"), "the running bridge stays")
        }
    }
}
