import ArgumentParser
import BridgeCore
import BridgeDaemon
import Foundation
import LinuxIO
import Logging
import Synchronization
import VhostUser

@main
struct Daemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vhost-pci-bridged",
        abstract: "The vhost-pci bridge daemon: a vhost-user back end for VM1 that exposes VM1's memory to VM2 at BAR offset = bus address.",
        discussion: """
        Run the bridges of a config file: vhost-pci-bridged --config /etc/vhost-pci-bridged.yaml (SIGHUP or \
        'vhost-pci-bridgectl reload' re-reads it; the control socket serves vhost-pci-bridgectl). Or run one bridge from flags, \
        like other vhost-user back ends: vhost-pci-bridged --socket-path VM1.sock --peer-socket VM2.sock --bar-size 64G --mode identity. \
        Flags override the file. SIGTERM or SIGINT stops cleanly (every mapping is revoked from VM2 first).
        """
    )

    @Option(help: "YAML config file (see config/vhost-pci-bridged.yaml).")
    var config: String?

    @Option(help: "Runtime directory (default sockets); overrides the config file.")
    var runtimeDirectory: String?

    @Option(help: "Control socket path; overrides the config file. Without --config there is none unless this is given.")
    var controlSocket: String?

    @Option(help: "Listen for the vhost-user front end (VM1's VMM) on this Unix socket path (one bridge from flags).")
    var socketPath: String?

    @Option(help: "Serve the already connected vhost-user socket inherited as this fd (incompatible with --socket-path).")
    var fd: Int32?

    @Flag(help: "Connect to --socket-path (created by the front end, e.g. QEMU server=on) instead of listening; reconnect when it drops.")
    var client = false

    @Flag(help: "Print the back-end capabilities as JSON and exit.")
    var printCapabilities = false

    @Option(help: "Listen for VM2 (the vhost-pci device side, docs/peer-protocol.md) on this Unix socket path.")
    var peerSocket: String?

    @Option(help: "Bridge name used in logs, errors and the control socket.")
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

    @Option(help: "Queue pairs offered (GET_QUEUE_NUM), 1-128; above 1, MQ and CTRL_VQ are offered too (the front end serves the control queue).")
    var queuePairs: Int = BackendConfiguration.defaultQueuePairs

    @Option(help: "Device features offered to VM1, comma-separated: event-idx, mrg-rxbuf (version-1 always). VM2 must declare it serves them, or its HELLO is refused. Default: event-idx,mrg-rxbuf.")
    var deviceFeatures: String = "event-idx,mrg-rxbuf"

    @Option(help: "Milliseconds VM2 has to acknowledge a revocation before it is disconnected.")
    var revocationDeadline: Int = 100

    @Option(help: "Vring notifications: relay (io_uring, default), relay-sqpoll, or passthrough (VM1's eventfds handed to VM2).")
    var notifications: String = "relay"

    @Option(name: .customLong("busy-poll-us"), help: "Relay modes: microseconds to spin reaping completions before sleeping (0-10000).")
    var busyPollMicroseconds: Int = 0

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (overrides the config file).")
    var logLevel: String?

    func validate() throws {
        if printCapabilities { return }
        if socketPath != nil && fd != nil { throw ValidationError("--socket-path and --fd are incompatible") }
        if socketPath == nil && fd == nil && config == nil { throw ValidationError("give --config FILE, --socket-path PATH or --fd FDNUM") }
        if client && socketPath == nil { throw ValidationError("--client needs --socket-path") }
        if BridgeMode(rawValue: mode) == nil { throw ValidationError("--mode: '\(mode)' is not identity, iommu or static") }
        if parseByteSize(barSize) == nil { throw ValidationError("--bar-size: '\(barSize)' is not a size") }
        if let l = logLevel, Logger.Level(rawValue: l) == nil { throw ValidationError("--log-level: '\(l)' is not a level") }
        if NotificationMode(rawValue: notifications) == nil { throw ValidationError("--notifications: '\(notifications)' is not relay, relay-sqpoll or passthrough") }
        if busyPollMicroseconds < 0 || busyPollMicroseconds > 10_000 { throw ValidationError("--busy-poll-us: \(busyPollMicroseconds) is not in 0...10000") }
        if queuePairs < 1 || queuePairs > BackendConfiguration.maximumQueuePairs {
            throw ValidationError("--queue-pairs: \(queuePairs) is not in 1...\(BackendConfiguration.maximumQueuePairs)")
        }
        do {
            _ = try DaemonConfig.deviceFeatures(commaSeparated: deviceFeatures, "--device-features")
        } catch { throw ValidationError("\(error)") }
        if revocationDeadline < 1 || revocationDeadline > 60_000 { throw ValidationError("--revocation-deadline: \(revocationDeadline) ms is not in 1...60000") }
        for w in staticWindows where BusWindow(parsing: w) == nil {
            throw ValidationError("--static-window: '\(w)' is not BASE:LIMIT with LIMIT > BASE")
        }
        if let w = dmaWindow, BusWindow(parsing: w) == nil {
            throw ValidationError("--dma-window: '\(w)' is not BASE:LIMIT with LIMIT > BASE")
        }
    }

    func fail(_ text: String) -> ExitCode {
        FileHandle.standardError.write(Data("vhost-pci-bridged: \(text)\n".utf8))
        return ExitCode(1)
    }

    func loadConfig() throws -> DaemonConfig {
        guard let config else { return DaemonConfig() }
        let text: String
        do { text = try String(contentsOfFile: config, encoding: .utf8) } catch { throw fail("cannot read \(config): \(error.localizedDescription)") }
        var parsed: DaemonConfig
        do { parsed = try DaemonConfig.parse(text) } catch { throw fail("\(config): \(error)") }
        if let d = runtimeDirectory {
            // Bridges whose sockets were defaulted follow the new runtime directory.
            for i in parsed.bridges.indices {
                let n = parsed.bridges[i].name
                if parsed.bridges[i].vhostUserSocket == "\(parsed.runtimeDirectory)/\(n)-vm1.sock" { parsed.bridges[i].vhostUserSocket = "\(d)/\(n)-vm1.sock" }
                if parsed.bridges[i].peerSocket == "\(parsed.runtimeDirectory)/\(n)-vm2.sock" { parsed.bridges[i].peerSocket = "\(d)/\(n)-vm2.sock" }
            }
            if parsed.controlSocket == "\(parsed.runtimeDirectory)/control.sock" { parsed.controlSocket = "\(d)/control.sock" }
            parsed.runtimeDirectory = d
        }
        if let c = controlSocket { parsed.controlSocket = c }
        if let l = logLevel.flatMap(Logger.Level.init(rawValue:)) { parsed.logLevel = l }
        return parsed
    }

    func flagBridge() -> BridgeConfig? {
        guard let socketPath else { return nil }
        let space = AddressSpaceConfiguration(
            barSize: parseByteSize(barSize) ?? 0, mode: BridgeMode(rawValue: mode) ?? .identity,
            dmaWindow: dmaWindow.flatMap { BusWindow(parsing: $0) },
            staticWindows: staticWindows.compactMap { BusWindow(parsing: $0) }, maxMappings: maxMappings)
        var b = BridgeConfig(name: name, vhostUserSocket: socketPath, peerSocket: peerSocket, vm2: name, addressSpace: space)
        b.notifications = NotificationMode(rawValue: notifications) ?? .relay
        b.busyPollMicroseconds = busyPollMicroseconds
        b.revocationDeadlineMilliseconds = revocationDeadline
        b.queuePairs = queuePairs
        b.deviceFeatures = (try? DaemonConfig.deviceFeatures(commaSeparated: deviceFeatures, "--device-features")) ?? .defaultOffer
        b.client = client
        return b
    }

    func run() throws {
        if printCapabilities {
            print(#"{"type": "net", "features": []}"#)
            return
        }
        // Before any thread starts: a peer's dead pipe or socket must fail a
        // write with EPIPE, never kill every bridge; and each session holds
        // several fds, so take the hard RLIMIT_NOFILE.
        Signals.ignoreBrokenPipe()
        _ = try? ResourceLimits.raiseOpenFiles()
        var daemonConfig = try loadConfig()
        if let b = flagBridge() {
            do { try b.addressSpace.validate() } catch { throw fail("--bar-size/--mode/windows: \(error)") }
            daemonConfig.bridges.append(b)
            do { try daemonConfig.validate() } catch { throw fail("\(error)") }
        }
        JournalLogHandler.level.withLock { $0 = daemonConfig.logLevel }
        LoggingSystem.bootstrap { label in JournalLogHandler(label: label) }
        let logger = Logger(label: "vhost-pci-bridged")
        let notifier = SystemdNotifier()
        Signals.block([SIGTERM, SIGINT, SIGHUP])
        if config != nil || controlSocket != nil {
            try? FileManager.default.createDirectory(atPath: daemonConfig.runtimeDirectory, withIntermediateDirectories: true)
        }

        // --fd: one session on an inherited socket, then exit (back-end convention).
        if let fd {
            guard let b = flagBridge() ?? Optional(BridgeConfig(name: name, vhostUserSocket: "/dev/null", peerSocket: peerSocket, vm2: name,
                                                                 addressSpace: AddressSpaceConfiguration(barSize: parseByteSize(barSize) ?? 0, mode: BridgeMode(rawValue: mode) ?? .identity))) else { return }
            var settings = b.settings
            settings.socketPath = nil
            let bridge: Bridge
            do { bridge = try Bridge(settings, logger: logger) } catch { throw fail("\(error)") }
            let socket = UnixSocket(adopting: OwnedFileDescriptor(adopting: fd), kind: .stream)
            let server = try JoinableThread(name: "bridge") { bridge.serve(connection: socket); kill(getpid(), SIGTERM) }
            notifier.notify("READY=1", "STATUS=serving fd \(fd)")
            _ = Signals.wait(for: [SIGTERM, SIGINT])
            notifier.notify("STOPPING=1")
            bridge.stop()
            server.join()
            return
        }

        let controller = DaemonController(config: daemonConfig, logger: logger)
        let failures = controller.startConfiguredBridges()
        for (bridge, reason) in failures.sorted(by: { $0.key < $1.key }) { logger.error("bridge \(bridge) did not start: \(reason)") }
        if !daemonConfig.bridges.isEmpty && failures.count == daemonConfig.bridges.count {
            controller.stopAll()
            throw fail("no bridge could start")
        }
        let configPath = config
        let reload: @Sendable () -> Result<DaemonConfig, ControlError> = {
            guard let configPath else { return .failure(ControlError("no-config", "the daemon was not started with --config")) }
            do {
                return .success(try DaemonConfig.parse(try String(contentsOfFile: configPath, encoding: .utf8)))
            } catch let e as ConfigError {
                return .failure(ControlError("invalid-config", "\(configPath): \(e)"))
            } catch {
                return .failure(ControlError("invalid-config", "\(configPath): \(error.localizedDescription)"))
            }
        }
        var control: ControlServer?
        if config != nil || controlSocket != nil {
            let group = daemonConfig.controlGroup.flatMap { SocketPermissions.groupID(named: $0) }
            if daemonConfig.controlGroup != nil && group == nil { logger.warning("control-group \(daemonConfig.controlGroup ?? ""): no such group; root only") }
            // The unit makes the runtime directory root:root 0750: the control
            // group must be able to traverse it to reach the socket.
            if let group, (daemonConfig.controlSocket as NSString).deletingLastPathComponent == daemonConfig.runtimeDirectory {
                do { try SocketPermissions.apply(path: daemonConfig.runtimeDirectory, mode: 0o750, group: group) } catch {
                    logger.warning("cannot give group \(group) access to \(daemonConfig.runtimeDirectory): \(error)")
                }
            }
            do {
                control = try ControlServer(path: daemonConfig.controlSocket, mode: daemonConfig.controlMode, group: group,
                                            controller: controller, logger: logger, reloadConfig: reload)
            } catch {
                controller.stopAll()
                throw fail("control socket \(daemonConfig.controlSocket): \(error)")
            }
        }
        let status = { "STATUS=\(controller.bridgeNames.count) bridge(s): \(controller.bridgeNames.joined(separator: ", "))" }
        notifier.notify("READY=1", status())
        logger.notice("ready: \(controller.bridgeNames.count) bridge(s)\(control.map { ", control socket \($0.path)" } ?? "")")

        // Watchdog keep-alive at half the interval systemd asked for.
        let running = Atomic<Bool>(true)
        let stopWatchdog = try EventFD()
        var watchdog: JoinableThread?
        if let usec = SystemdNotifier.watchdogMicroseconds() {
            watchdog = try JoinableThread(name: "watchdog") {
                while running.load(ordering: .acquiring) {
                    notifier.notify("WATCHDOG=1")
                    _ = stopWatchdog.wait(until: .now.advanced(by: .microseconds(Int64(usec / 2)))) {
                        running.load(ordering: .acquiring) ? nil : true
                    }
                }
            }
        }

        while true {
            let signal = Signals.wait(for: [SIGTERM, SIGINT, SIGHUP])
            if signal == SIGHUP {
                notifier.notify("RELOADING=1", "STATUS=reloading")
                switch reload() {
                case .success(let new):
                    let report = controller.reload(new)
                    if !report.needsRestart.isEmpty { logger.warning("changed bridges keep their old settings until a restart: \(report.needsRestart)") }
                case .failure(let e):
                    logger.error("reload refused, keeping the running config: \(e.message)")
                }
                notifier.notify("READY=1", status())
                continue
            }
            logger.notice("signal \(signal): stopping")
            break
        }
        notifier.notify("STOPPING=1", "STATUS=stopping: revoking every mapping")
        running.store(false, ordering: .releasing)
        _ = try? stopWatchdog.signal()
        watchdog?.join()
        control?.stop()
        controller.stopAll()
        logger.notice("stopped")
    }
}
