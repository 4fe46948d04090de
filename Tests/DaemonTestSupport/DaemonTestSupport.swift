import BridgeDaemon
import ControlClient
import Foundation
import LinuxIO
import Logging
import Testing
import TestSupport

/// A daemon controller with a control server, in process.
public final class LiveDaemon {
    public let dir: String
    public let controller: DaemonController
    public let server: ControlServer

    public init(_ yaml: String, authorize: ControlServer.Authorizer? = nil) throws {
        dir = "/tmp/vpb-ctl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let text = "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\n" + yaml
        let config = try DaemonConfig.parse(text)
        controller = DaemonController(config: config, logger: quietLogger())
        #expect(controller.startConfiguredBridges().isEmpty)
        let replacement = dir
        server = try ControlServer(path: config.controlSocket, mode: 0o600, group: nil, controller: controller, logger: quietLogger(),
                                   authorize: authorize, reloadConfig: {
            .success((try? DaemonConfig.parse("runtime-directory: \(replacement)\ncontrol-socket: \(replacement)/control.sock\nlog-level: debug\nbridges:\n  - name: fresh\n    bar-size: 1G\n")) ?? DaemonConfig())
        })
    }

    public func client() throws -> ControlClient { try ControlClient(path: "\(dir)/control.sock") }

    public func stop() {
        server.stop()
        controller.stopAll()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

public func ok(_ r: [String: Any], sourceLocation: SourceLocation = #_sourceLocation) -> Any? {
    #expect(r["ok"] as? Bool == true, "\(r)", sourceLocation: sourceLocation)
    return r["result"]
}

public func errorCode(_ r: [String: Any]) -> String? { (r["error"] as? [String: Any])?["code"] as? String }
public func errorMessage(_ r: [String: Any]) -> String { (r["error"] as? [String: Any])?["message"] as? String ?? "" }

extension ControlClient {
    /// Any JSON object as a request (malformed ones too: tests of the wire
    /// need what no `ControlRequest` encodes) and the response as a JSON object.
    public func call(_ request: [String: Any]) throws(Failure) -> [String: Any] {
        guard let data = try? JSONSerialization.data(withJSONObject: request, options: [.sortedKeys]) else {
            throw .io("cannot encode the request")
        }
        let line = try callRaw(String(decoding: data, as: UTF8.self))
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { throw .badResponse(line) }
        return object
    }
}
