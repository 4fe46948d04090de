import BridgeCore
import BridgeDaemon
import Foundation
import Testing
import TestSupport

/// The whole control protocol's JSON, request by request, against a
/// controller with two bridges: every response's keys, order and values
/// (the changing ones — uptime, pid, build version, relay engine — blanked),
/// compared with Tests/Snapshots/control-wire.txt. VPB_WIRE_SNAPSHOT=path
/// writes what this build answers there instead.
@Suite(.serialized) struct ControlWireSnapshotTests {
    static let requests: [String] = [
        #"{"command":"status"}"#,
        #"{"command":"list"}"#,
        #"{"command":"show","name":"a"}"#,
        #"{"command":"show","name":"s"}"#,
        #"{"command":"stats"}"#,
        #"{"command":"stats","name":"a"}"#,
        #"{"command":"stats","name":""}"#,
        #"{"command":"stats","name":7}"#,
        #"{"command":"log-level","level":"debug"}"#,
        #"{"command":"log-level","level":"loud"}"#,
        #"{"command":"log-level"}"#,
        #"{"command":"show"}"#,
        #"{"command":"show","name":""}"#,
        #"{"command":"show","name":3}"#,
        #"{"command":"show","name":"ghost"}"#,
        #"{"command":"destroy","name":"ghost"}"#,
        #"{"command":"freeze","name":"s"}"#,
        #"{"command":"map","name":"s","bus":"0","gpa":"0","length":"4K"}"#,
        #"{"command":"map","name":"ghost","bus":"zz","gpa":"0","length":"4K"}"#,
        #"{"command":"map","name":"s","bus":"zz","gpa":"0","length":"4K"}"#,
        #"{"command":"map","name":"s","bus":0,"gpa":-1,"length":"4K"}"#,
        #"{"command":"map","name":"s","bus":0,"gpa":0,"length":4096,"perm":"x"}"#,
        #"{"command":"map","name":"s","bus":0,"gpa":0,"length":4096,"perm":5}"#,
        #"{"command":"map","name":"s","bus":0,"gpa":0}"#,
        #"{"command":"unmap","name":"s","bus":"0x1000"}"#,
        #"{"command":"unmap","name":"s","bus":"0x1000","length":"4K"}"#,
        #"{"command":"create"}"#,
        #"{"command":"create","bridge":[1]}"#,
        #"{"command":"create","bridge":{"bar-size":"1G"}}"#,
        #"{"command":"create","bridge":{"name":"c","bar-size":"3G"}}"#,
        #"{"command":"create","bridge":{"name":"c","bar-size":"1G","colour":"blue"}}"#,
        #"{"command":"create","bridge":{"name":"c","bar-size":"1G","client":"maybe"}}"#,
        #"{"command":"create","bridge":{"name":"c","bar-size":1073741824,"max-mappings":"12","mode":"iommu","dma-window":"0:512M"}}"#,
        #"{"command":"create","bridge":{"name":"c","bar-size":"1G"}}"#,
        #"{"command":"destroy","name":"c"}"#,
        #"{"command":"destroy"}"#,
        #"{"command":"metrics"}"#,
        #"{"command":"reload"}"#,
        #"{"command":"dance"}"#,
        #"{"command":""}"#,
        #"{"command":1}"#,
        #"{"nothing":1}"#,
        #"{"command":"status","version":9}"#,
        #"{"command":"status","version":1}"#,
        #"{"command":"status","version":"9"}"#,
        #"{not json"#,
        #"[1,2]"#,
        #"7"#,
    ]

    @Test func everyResponse() throws {
        let dir = "/tmp/vpb-wire-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try DaemonConfig.parse("""
        runtime-directory: \(dir)
        control-socket: \(dir)/control.sock
        bridges:
          - name: a
            bar-size: 64G
            cpu-affinity: [0]
          - name: s
            bar-size: 1G
            mode: static
            static-windows: ["0:16M"]
            peer-socket: \(dir)/s-peer.sock
        """)
        let controller = DaemonController(config: config, logger: quietLogger())
        defer { controller.stopAll() }
        #expect(controller.startConfiguredBridges().isEmpty)
        var out = ""
        for request in Self.requests {
            var reply = controller.handle(line: request, reloadConfig: { .success(config) })
            for key in ["uptimeSeconds", "pid", "buildVersion"] {
                reply = reply.replacingOccurrences(of: #""\#(key)":[^,}]*"#, with: #""\#(key)":_"#, options: .regularExpression)
            }
            reply = reply.replacingOccurrences(of: #""relayEngine":"[^"]*""#, with: #""relayEngine":_"#, options: .regularExpression)
                .replacingOccurrences(of: #"version=\"\#(BuildInfo.version)\""#, with: #"version=\"_\""#)
            reply = reply.replacingOccurrences(of: dir, with: "DIR").replacingOccurrences(of: dir.replacingOccurrences(of: "/", with: #"\/"#), with: "DIR")
            out += request + "\n" + reply + "\n\n"
        }
        if let path = ProcessInfo.processInfo.environment["VPB_WIRE_SNAPSHOT"] {
            try out.write(toFile: path, atomically: true, encoding: .utf8)
            return
        }
        let golden = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Snapshots/control-wire.txt")
        let expected = try String(contentsOf: golden, encoding: .utf8)
        let (got, want) = (out.split(separator: "\n", omittingEmptySubsequences: false), expected.split(separator: "\n", omittingEmptySubsequences: false))
        for (i, line) in want.enumerated() where i >= got.count || got[i] != line {
            Issue.record("line \(i + 1): expected\n\(line)\ngot\n\(i < got.count ? got[i] : "(nothing)")")
            break
        }
        #expect(got.count == want.count)
    }
}
