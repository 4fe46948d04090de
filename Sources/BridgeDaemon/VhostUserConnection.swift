import BridgeCore
import LinuxIO
import Logging
import VhostUser

/// How a front-end connection ended, and what it did.
public struct ConnectionSummary: Sendable, Equatable {
    public enum End: Sendable, Equatable {
        /// The front end closed the connection.
        case frontEndClosed
        /// The daemon closed it: a refused request without an ack, a broken
        /// message, a window failure.
        case closedByBridge(String)
        /// The bridge is stopping.
        case stopped
    }
    public var end: End
    public var statistics: SessionStatistics
}

/// What a live session looks like from outside (status output, tests).
public struct SessionView: Sendable, Equatable {
    public var ackedFeatures: UInt64?
    public var protocolFeatures: ProtocolFeatures
    public var regions: Int
    public var mappings: Int
    public var mappedBytes: UInt64
    public var startedRings: [Int]
    public var enabledRings: [Int]
    public var ringLayouts: [Int: VringLayout]

    init(_ s: BackendSession) {
        ackedFeatures = s.ackedFeatures
        protocolFeatures = s.ackedProtocolFeatures
        regions = s.regions.count
        mappings = s.addressSpace.mappings.count
        mappedBytes = s.addressSpace.mappedBytes
        startedRings = s.vrings.indices.filter { s.vrings[$0].started }
        enabledRings = s.vrings.indices.filter { s.vrings[$0].enabled }
        var layouts: [Int: VringLayout] = [:]
        for (i, v) in s.vrings.enumerated() { if let l = v.layout { layouts[i] = l } }
        ringLayouts = layouts
    }
}

/// Serves one vhost-user front end on one connected socket: reads framed
/// messages, feeds them to the pure `BackendSession`, and carries out its
/// effects (replies, window plans, fd ownership). Owns every fd the front end
/// sent until the session releases it; on return every one is closed and the
/// BAR window holds no mapping of this session.
///
/// Used by one thread only (the bridge's connection thread).
final class VhostUserConnection {
    private let socket: UnixSocket
    private var session: BackendSession
    private let window: BARWindow
    private let logger: Logger
    private var regionFiles: [RegionID: OwnedFileDescriptor] = [:]
    private var vringFiles: [Int: [VringFileKind: OwnedFileDescriptor]] = [:]
    private var backendChannel: UnixSocket?
    private let isStopping: @Sendable () -> Bool
    private let publish: @Sendable (SessionView?) -> Void

    init(socket: UnixSocket, configuration: BackendConfiguration, window: BARWindow, logger: Logger,
         isStopping: @escaping @Sendable () -> Bool,
         publish: @escaping @Sendable (SessionView?) -> Void = { _ in }) throws(ConfigurationError) {
        self.publish = publish
        self.socket = socket
        self.session = try BackendSession(configuration)
        self.window = window
        self.logger = logger
        self.isStopping = isStopping
    }

    /// Runs until the connection ends; always tears the session down.
    func run() -> ConnectionSummary {
        let end = serve()
        tearDown()
        return ConnectionSummary(end: end, statistics: session.statistics)
    }

    private func serve() -> ConnectionSummary.End {
        while true {
            let message: FramedMessage
            do {
                guard let m = try socket.receiveFramed(payloadSize: { bytes in
                    let header = try MessageHeader.decode(bytes)
                    _ = try VhostUserCodec.validate(header)
                    return Int(header.size)
                }) else {
                    return isStopping() ? .stopped : .frontEndClosed
                }
                message = m
            } catch {
                if isStopping() { return .stopped }
                logger.warning("closing the vhost-user connection: \(error)")
                return .closedByBridge("\(error)")
            }
            let reason = handle(message)
            publish(SessionView(session))
            if let reason { return .closedByBridge(reason) }
        }
    }

    /// Handles one message; returns a reason when the connection must close.
    private func handle(_ message: FramedMessage) -> String? {
        // Both already validated by receiveFramed's callback.
        guard let header = try? MessageHeader.decode(message.header),
              let code = try? VhostUserCodec.validate(header) else { return "header re-validation failed" }
        defer { for fd in message.fds { try? fd.close() } } // whatever no effect claimed
        let replyAck = session.ackedProtocolFeatures.contains(.replyAck)

        let request: FrontendRequest
        do {
            if message.fdsTruncated { throw VhostUserError.fdCount(code, got: UnixSocket.defaultMaximumFDs + 1, rule: .none) }
            request = try VhostUserCodec.decode(code, payload: message.payload, fdCount: message.fds.count)
        } catch {
            logger.warning("refused \(code): \(error)")
            if header.needsReply && replyAck {
                return send(VhostUserCodec.encodeReply(to: code, .u64(1)))
            }
            return "\(code): \(error)"
        }

        let files = message.fds.enumerated().map { i, fd in ReceivedFile(index: i, size: try? fd.fileSize()) }
        let outcome = session.handle(request, needReply: header.needsReply, files: files)
        if let error = outcome.error {
            logger.warning("refused \(code): \(error)", metadata: ["rule": "\(error.rule)"])
        } else {
            logger.trace("handled \(code)")
        }
        if let reason = execute(outcome.effects, fds: message.fds) { return reason }
        return outcome.closeConnection ? "\(code): \(outcome.error.map { "\($0)" } ?? "refused")" : nil
    }

    private func send(_ bytes: [UInt8]) -> String? {
        do { try socket.send(bytes); return nil } catch { return "reply failed: \(error)" }
    }

    /// Carries out effects in order. Fds named by an effect are moved out of
    /// the message (the caller closes the rest).
    private func execute(_ effects: [SessionEffect], fds: [OwnedFileDescriptor]) -> String? {
        func take(_ index: Int) -> OwnedFileDescriptor? {
            guard index >= 0, index < fds.count, fds[index].isOpen else { return nil }
            // Move ownership: a new owner object, the message's one emptied.
            return OwnedFileDescriptor(adopting: fds[index].release())
        }
        for effect in effects {
            switch effect {
            case .reply(let bytes):
                if let failure = send(bytes) { return failure }
            case .adoptRegionFile(let id, let index):
                if let fd = take(index) { regionFiles[id] = fd }
            case .window(let plan):
                do {
                    try window.apply(plan) { [regionFiles] id in regionFiles[id]?.rawValue }
                } catch {
                    logger.error("BAR window operation failed, closing the session: \(error)")
                    return "window: \(error)"
                }
            case .releaseRegionFile(let id):
                try? regionFiles.removeValue(forKey: id)?.close()
            case .setVringFile(let kind, let index, let fdIndex):
                try? vringFiles[index]?.removeValue(forKey: kind)?.close()
                if let fdIndex, let fd = take(fdIndex) { vringFiles[index, default: [:]][kind] = fd }
            case .adoptBackendChannel(let index):
                try? backendChannel?.fd.close()
                backendChannel = take(index).map { UnixSocket(adopting: $0, kind: .stream) }
            case .sendBackend(let bytes):
                do {
                    try backendChannel?.send(bytes, nonBlocking: true)
                } catch {
                    logger.warning("back-end channel send failed: \(error)")
                }
            case .ringStarted(let index, let layout):
                logger.info("vring \(index) started: \(layout.queueSize) entries, desc \(layout.descriptorTable), avail \(layout.availRing), used \(layout.usedRing)")
            case .ringStopped(let index):
                logger.info("vring \(index) stopped")
            case .ringEnabled(let index, let enabled):
                logger.debug("vring \(index) \(enabled ? "enabled" : "disabled")")
            }
        }
        return nil
    }

    private func tearDown() {
        _ = execute(session.teardown(), fds: [])
        for fd in regionFiles.values { try? fd.close() }
        regionFiles = [:]
        for files in vringFiles.values { for fd in files.values { try? fd.close() } }
        vringFiles = [:]
        try? backendChannel?.fd.close()
        backendChannel = nil
        try? socket.fd.close()
        publish(nil)
    }
}
