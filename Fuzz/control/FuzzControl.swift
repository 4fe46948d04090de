import BridgeCore
import BridgeDaemon
import Foundation
import FuzzSupport
import Logging

/// The control socket's request handler on arbitrary lines, against a daemon
/// with one live bridge: every line gets exactly one JSON response with
/// `ok` true or false. Bridges a request created are destroyed after each
/// input, and the configured one is started again if a request destroyed
/// it, so every input starts from the same daemon.
let controller: DaemonController = {
    let dir = "/tmp/vpb-fuzz-control-\(getpid())"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    var logger = Logger(label: "fuzz")
    logger.logLevel = .critical
    let config = try! DaemonConfig.parse("""
    runtime-directory: \(dir)
    control-socket: \(dir)/control.sock
    bridges:
      - name: b0
        bar-size: 1G
        mode: iommu
    """)
    let c = DaemonController(config: config, logger: logger)
    if !c.startConfiguredBridges().isEmpty { fuzzFailure("the fixture bridge did not start") }
    return c
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzControl(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let text = String(decoding: input.rest(), as: UTF8.self)
    for line in text.split(separator: "\n", omittingEmptySubsequences: false).prefix(8) {
        let response = controller.handle(line: String(line))
        guard let object = try? JSONSerialization.jsonObject(with: Data(response.utf8)) as? [String: Any],
              object["ok"] is Bool, object["version"] as? Int == 1 else {
            fuzzFailure("not a response: \(response)")
        }
    }
    for name in controller.bridgeNames where name != "b0" {
        _ = controller.handle(line: #"{"command":"destroy","name":"\#(name)"}"#)
    }
    if !controller.bridgeNames.contains("b0"), !controller.startConfiguredBridges().isEmpty {
        fuzzFailure("the configured bridge could not be started again")
    }
    return 0
}
