import ArgumentParser
import BridgeCore
import BridgeDaemon
import Foundation
import LinuxIO
import Logging
import VhostUser

@main
struct Daemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-bridged",
        abstract: "The vhost-pci bridge daemon: a vhost-user back end for VM1 that exposes VM1's memory to VM2 at BAR offset = bus address.",
        discussion: """
        One bridge from flags, following the vhost-user back-end program conventions:
          vhost-pci-bridged --socket-path /run/vm1-net.sock --bar-size 64G --mode identity
        The daemon listens on --socket-path (or serves the already connected socket --fd), one
        front-end session at a time; when the front end disconnects, every mapping and fd of the
        session is released and the next one may connect. SIGTERM or SIGINT stops it cleanly.
        """
    )

    @Option(help: "Listen for the vhost-user front end (VM1's VMM) on this Unix socket path.")
    var socketPath: String?

    @Option(help: "Serve the already connected vhost-user socket inherited as this fd (incompatible with --socket-path).")
    var fd: Int32?

    @Flag(help: "Connect to --socket-path (created by the front end, e.g. QEMU server=on) instead of listening; reconnect when it drops.")
    var client = false

    @Flag(help: "Print the back-end capabilities as JSON and exit.")
    var printCapabilities = false

    @Option(help: "Listen for VM2 (the vhost-pci device side, docs/peer-protocol.md) on this Unix socket path.")
    var peerSocket: String?

    @Option(help: "Milliseconds VM2 has to acknowledge a revocation before it is disconnected.")
    var revocationDeadline: Int = 100

    @Option(help: "Vring notifications: relay (io_uring, default), relay-sqpoll, or passthrough (VM1's eventfds handed to VM2).")
    var notifications: String = "relay"

    @Option(name: .customLong("busy-poll-us"), help: "Relay modes: microseconds to spin reaping completions before sleeping (0-10000).")
    var busyPollMicroseconds: Int = 0

    @Option(help: "Bridge name used in logs and errors.")
    var name: String = "bridge0"

    @Option(help: "BAR size, a power of two from 4K to 256T (e.g. 64G, 1T).")
    var barSize: String = "64G"

    @Option(help: "identity (VM1 without vIOMMU: regions at their GPA), iommu (IOTLB-mapped ranges at their IOVA) or static (fixed windows).")
    var mode: String = "identity"

    @Option(name: .customLong("static-window"), help: "A static window BASE:LIMIT (limit exclusive); repeat for several. static mode only.")
    var staticWindows: [String] = []

    @Option(help: "DMA window BASE:LIMIT that VM1's IOMMU must allocate from (iommu/static modes).")
    var dmaWindow: String?

    @Option(help: "Most live mappings in the BAR.")
    var maxMappings: Int = AddressSpaceConfiguration.defaultMaxMappings

    @Option(help: "Queue pairs offered (GET_QUEUE_NUM).")
    var queuePairs: Int = 1

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        if printCapabilities { return }
        if socketPath != nil && fd != nil { throw ValidationError("--socket-path and --fd are incompatible") }
        if socketPath == nil && fd == nil { throw ValidationError("give --socket-path PATH or --fd FDNUM") }
        if client && socketPath == nil { throw ValidationError("--client needs --socket-path") }
        if BridgeMode(rawValue: mode) == nil { throw ValidationError("--mode: '\(mode)' is not identity, iommu or static") }
        if parseByteSize(barSize) == nil { throw ValidationError("--bar-size: '\(barSize)' is not a size") }
        if NotificationMode(rawValue: notifications) == nil { throw ValidationError("--notifications: '\(notifications)' is not relay, relay-sqpoll or passthrough") }
        if busyPollMicroseconds < 0 || busyPollMicroseconds > 10_000 { throw ValidationError("--busy-poll-us: \(busyPollMicroseconds) is not in 0...10000") }
        if revocationDeadline < 1 || revocationDeadline > 60_000 { throw ValidationError("--revocation-deadline: \(revocationDeadline) ms is not in 1...60000") }
        if Logger.Level(rawValue: logLevel) == nil { throw ValidationError("--log-level: '\(logLevel)' is not a level") }
        for w in staticWindows where BusWindow(parsing: w) == nil {
            throw ValidationError("--static-window: '\(w)' is not BASE:LIMIT with LIMIT > BASE")
        }
        if let w = dmaWindow, BusWindow(parsing: w) == nil {
            throw ValidationError("--dma-window: '\(w)' is not BASE:LIMIT with LIMIT > BASE")
        }
    }

    func run() throws {
        if printCapabilities {
            print(#"{"type": "net", "features": []}"#)
            return
        }
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "vhost-pci-bridged")
        let space = AddressSpaceConfiguration(
            barSize: parseByteSize(barSize) ?? 0, mode: BridgeMode(rawValue: mode) ?? .identity,
            dmaWindow: dmaWindow.flatMap { BusWindow(parsing: $0) },
            staticWindows: staticWindows.compactMap { BusWindow(parsing: $0) }, maxMappings: maxMappings)
        var settings = BridgeSettings(name: name, socketPath: socketPath, peerSocketPath: peerSocket,
                                      backend: BackendConfiguration(bridgeName: name, addressSpace: space, queuePairs: queuePairs),
                                      revocationDeadlineMilliseconds: revocationDeadline,
                                      notifications: NotificationMode(rawValue: notifications) ?? .relay,
                                      busyPollMicroseconds: busyPollMicroseconds)
        settings.client = client

        // Signals are blocked in every thread and waited for on this one.
        Signals.block([SIGTERM, SIGINT, SIGHUP])
        let bridge: Bridge
        do { bridge = try Bridge(settings, logger: logger) } catch {
            FileHandle.standardError.write(Data("vhost-pci-bridged: \(error)\n".utf8))
            throw ExitCode(1)
        }
        let server: JoinableThread
        if let fd {
            let socket = UnixSocket(adopting: OwnedFileDescriptor(adopting: fd), kind: .stream)
            server = try JoinableThread(name: "bridge") { bridge.serve(connection: socket); kill(getpid(), SIGTERM) }
        } else {
            server = try JoinableThread(name: "bridge") { bridge.serve() }
        }
        while true {
            let signal = Signals.wait(for: [SIGTERM, SIGINT, SIGHUP])
            if signal == SIGHUP {
                logger.notice("SIGHUP: nothing to reload without a config file")
                continue
            }
            logger.notice("signal \(signal): stopping")
            break
        }
        bridge.stop()
        server.join()
        let stats = bridge.statistics
        logger.notice("stopped after \(stats.sessionsServed) session(s), \(stats.requests) requests, \(stats.refusals.values.reduce(0, +)) refused")
    }
}
