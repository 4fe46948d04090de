import ArgumentParser
import BridgeCore
import BridgeDaemon
import FoundationEssentials
import Glibc
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
        """,
        version: BuildInfo.version
    )

    @Option(help: "YAML config file (see config/vhost-pci-bridged.yaml).")
    var config: String?

    @Option(help: "Runtime directory (default sockets, the control socket); overrides the config file. With it a daemon started from flags serves a control socket there.")
    var runtimeDirectory: String?

    @Option(help: "Control socket path; overrides the config file. Without --config there is none unless this or --runtime-directory is given.")
    var controlSocket: String?

    @Option(help: "Directory of the state file that keeps bridges made with 'vhost-pci-bridgectl create' across reloads and restarts (default: $STATE_DIRECTORY under systemd, else state-directory from the file; without either they last until the daemon exits).")
    var stateDirectory: String?

    @Option(help: "Listen for the vhost-user front end (VM1's VMM) on this Unix socket path (one bridge from flags).")
    var socketPath: String?

    @Option(help: "Serve the already connected vhost-user socket inherited as this fd, one session, then exit (the vhost-user back-end convention). Takes the same bridge flags as --socket-path.")
    var fd: Int32?

    @Flag(help: "Connect to --socket-path (created by the front end, e.g. QEMU server=on) instead of listening; reconnect when it drops.")
    var client = false

    @Flag(help: "Print the back-end capabilities as JSON (QEMU's vhost-user.json convention) and exit.")
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

    @Option(help: "Most live mappings in the BAR (default \(AddressSpaceConfiguration.defaultMaxMappings)).")
    var maxMappings: Int?

    @Option(help: "Queue pairs offered (GET_QUEUE_NUM), 1-128 (default \(BackendConfiguration.defaultQueuePairs)); above 1, MQ and CTRL_VQ are offered too (the front end serves the control queue).")
    var queuePairs: Int?

    @Option(help: "Device features offered to VM1, comma-separated: event-idx, mrg-rxbuf (version-1 always). VM2 must declare it serves them, or its HELLO is refused. Default: event-idx,mrg-rxbuf.")
    var deviceFeatures: String?

    @Option(help: "Milliseconds VM2 has to acknowledge a revocation before it is disconnected (default 100).")
    var revocationDeadline: Int?

    @Option(help: "Vring notifications: relay (io_uring, default), relay-sqpoll, or passthrough (VM1's eventfds handed to VM2).")
    var notifications: String?

    @Option(help: "CPUs for this bridge's relay thread (and the SQPOLL thread, bound to the first), e.g. 2-3 or 0,4.")
    var cpuAffinity: String?

    @Option(help: "VM1 memory not sealed against shrinking (DPDK's, QEMU seal=off, hugetlbfs files): mark (default: sent flagged to a VM2 that negotiated unsealedMaps and guards its accesses, never to another) or refuse (never sent to VM2).")
    var unsealedRegions: String?

    @Option(name: .customLong("busy-poll-us"), help: "Relay modes: microseconds to spin reaping completions before sleeping (0-10000, default 0).")
    var busyPollMicroseconds: Int?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (overrides the config file).")
    var logLevel: String?

    func validate() throws {
        if printCapabilities { return }
        if socketPath != nil && fd != nil { throw ValidationError("--socket-path and --fd are incompatible") }
        if socketPath == nil && fd == nil && config == nil { throw ValidationError("give --config FILE, --socket-path PATH or --fd FDNUM") }
        if client && socketPath == nil { throw ValidationError("--client needs --socket-path") }
        if let fd, let reason = UnixSocket.inheritedStreamRefusal(fd) { throw ValidationError("--fd: \(reason)") }
        if let l = logLevel, Logger.Level(rawValue: l) == nil { throw ValidationError("--log-level: '\(l)' is not a level") }
        do { _ = try flagBridge() } catch { throw ValidationError(Self.flagMessage(error)) }
    }

    func fail(_ text: String) -> ExitCode {
        Files.writeStandardError("vhost-pci-bridged: \(text)\n")
        return ExitCode(1)
    }

    /// The file's config, or the defaults without one.
    func loadFile() throws -> DaemonConfig {
        guard let config else { return DaemonConfig() }
        let bytes: [UInt8]
        do { bytes = try Files.read(config) } catch { throw fail("cannot read \(config): \(error)") }
        do { return try DaemonConfig.parse(utf8: bytes) } catch { throw fail("\(config): \(error)") }
    }

    /// The bridge the flags describe, whatever its socket (--socket-path or
    /// --fd): the flags become the same keys a config file's bridge has and
    /// go through the same parser, so they are checked and defaulted alike.
    func flagBridge() throws(ConfigError) -> BridgeConfig? {
        let socket: String
        if let fd { socket = "/dev/fd/\(fd)" } else if let socketPath { socket = socketPath } else { return nil }
        var spec: [String: ConfigValue] = ["name": .string(name), "vhost-user-socket": .string(socket), "bar-size": .string(barSize),
                                           "mode": .string(mode), "client": .bool(client)]
        if let peerSocket { spec["peer-socket"] = .string(peerSocket) }
        if !staticWindows.isEmpty { spec["static-windows"] = .list(staticWindows.map(ConfigValue.string)) }
        if let dmaWindow { spec["dma-window"] = .string(dmaWindow) }
        if let maxMappings { spec["max-mappings"] = .string(String(maxMappings)) }
        if let queuePairs { spec["queue-pairs"] = .string(String(queuePairs)) }
        if let deviceFeatures { spec["device-features"] = .string(deviceFeatures) }
        if let revocationDeadline { spec["revocation-deadline-ms"] = .string(String(revocationDeadline)) }
        if let notifications { spec["notifications"] = .string(notifications) }
        if let busyPollMicroseconds { spec["busy-poll-us"] = .string(String(busyPollMicroseconds)) }
        if let cpuAffinity { spec["cpu-affinity"] = .string(cpuAffinity) }
        if let unsealedRegions { spec["unsealed-regions"] = .string(unsealedRegions) }
        var b = try DaemonConfig.bridge(.mapping(spec), key: Self.flagKey, runtimeDirectory: DaemonConfig().runtimeDirectory)
        if peerSocket == nil { b.peerSocket = nil } // no VM2 socket unless asked for
        b.inheritedConnection = fd
        return b
    }

    static let flagKey = "(flags)"
    /// A config key as the flag that sets it.
    static let flagNames = ["vhost-user-socket": "--socket-path", "static-windows": "--static-window",
                            "revocation-deadline-ms": "--revocation-deadline"]

    /// "(flags).bar-size: ..." as "--bar-size: ...".
    static func flagMessage(_ error: ConfigError) -> String {
        guard error.key.hasPrefix(flagKey + ".") else { return "\(error)" }
        var key = String(error.key.dropFirst(flagKey.count + 1))
        if let bracket = key.firstIndex(of: "[") { key = String(key[..<bracket]) }
        return "\(flagNames[key] ?? "--" + key): \(error.reason)"
    }

    func run() throws {
        if printCapabilities {
            print(Capabilities.json)
            return
        }
        // Before any thread starts: a peer's dead pipe or socket must fail a
        // write with EPIPE, never kill every bridge; and each session holds
        // several fds, so take the hard RLIMIT_NOFILE; and large freed
        // buffers (mapping tables) go back to the kernel; and the threads
        // share two malloc arenas instead of one each.
        let environment = ProcessInfo.processInfo.environment
        Signals.ignoreBrokenPipe()
        _ = try? ResourceLimits.raiseOpenFiles()
        MemoryAllocator.returnLargeBuffersToTheKernel()
        MemoryAllocator.limitArenas(environment: environment)
        let overrides: DaemonOverrides
        do {
            overrides = DaemonOverrides(runtimeDirectory: runtimeDirectory, controlSocket: controlSocket,
                                        logLevel: logLevel.flatMap(Logger.Level.init(rawValue:)), bridge: try flagBridge())
        } catch { throw fail(Self.flagMessage(error)) }
        let daemonConfig: DaemonConfig
        do { daemonConfig = try overrides.applied(to: try loadFile()) } catch let e as ConfigError { throw fail(Self.flagMessage(e)) }
        JournalLogHandler.level.withLock { $0 = daemonConfig.logLevel }
        LoggingSystem.bootstrap { label in JournalLogHandler(label: label) }
        let logger = Logger(label: "vhost-pci-bridged")
        let notifier = SystemdNotifier()
        Signals.block([SIGTERM, SIGINT, SIGHUP])
        let servesControl = overrides.servesControlSocket(withConfigFile: config != nil)
        if config != nil || runtimeDirectory != nil {
            try? Files.createDirectories(daemonConfig.runtimeDirectory)
        }
        if servesControl {
            try? Files.createDirectories(Files.directory(of: daemonConfig.controlSocket))
        }
        let stateDir = stateDirectory ?? environment["STATE_DIRECTORY"].flatMap { $0.split(separator: ":").first.map(String.init) }
            ?? daemonConfig.stateDirectory
        let controller = DaemonController(config: daemonConfig, logger: logger, createdBridges: stateDir.map(CreatedBridges.init),
                                          inheritedSessionEnded: { Signals.terminateSelf() },
                                          notify: { lines in _ = lines.isEmpty ? false : notifier.notify(lines.joined(separator: "\n")) })
        // Every bridge of the file and the flags starts, or the daemon does
        // not: a config that cannot be carried out is refused whole, as a
        // reload is. Created bridges are the operator's: one that cannot come
        // back is reported (STATUS=, `status`) and the others run.
        let failures = controller.startConfiguredBridges()
        if !failures.isEmpty {
            let text = failures.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: "; ")
            notifier.notify("STATUS=not started: \(text)")
            controller.stopAll()
            throw fail("not every bridge could start, so none runs: \(text)")
        }
        controller.startCreatedBridges()
        let configPath = config
        let reloadSource: @Sendable () -> Result<DaemonConfig, ControlError> = {
            guard let configPath else { return .failure(ControlError("no-config", "the daemon was not started with --config")) }
            do {
                return .success(try overrides.applied(to: try DaemonConfig.parse(utf8: try Files.read(configPath))))
            } catch let e as ConfigError {
                return .failure(ControlError("invalid-config", "\(configPath): \(Self.flagMessage(e))"))
            } catch {
                return .failure(ControlError("invalid-config", "\(configPath): \(error)"))
            }
        }
        var control: ControlServer?
        if servesControl {
            let group = daemonConfig.controlGroup.flatMap { SocketPermissions.groupID(named: $0) }
            if daemonConfig.controlGroup != nil && group == nil { logger.warning("control-group \(daemonConfig.controlGroup ?? ""): no such group; root only") }
            // The unit makes the runtime directory root:root 0750: the control
            // group must be able to traverse it to reach the socket.
            if let group, Files.directory(of: daemonConfig.controlSocket) == daemonConfig.runtimeDirectory {
                do { try SocketPermissions.applyToDirectory(path: daemonConfig.runtimeDirectory, mode: 0o750, group: group) } catch {
                    logger.warning("cannot give group \(group) access to \(daemonConfig.runtimeDirectory): \(error)")
                }
            }
            do {
                control = try ControlServer(path: daemonConfig.controlSocket, mode: daemonConfig.controlMode, group: group,
                                            controller: controller, logger: logger, reloadConfig: reloadSource)
            } catch {
                controller.stopAll()
                throw fail("control socket \(daemonConfig.controlSocket): \(error)")
            }
        }
        notifier.notify("READY=1", "STATUS=" + controller.statusLine)
        logger.notice("ready (\(BuildInfo.version)): \(controller.bridgeNames.count) bridge(s)\(control.map { ", control socket \($0.path)" } ?? "")")

        // Under systemd: STATUS= kept current, and the watchdog pinged only
        // while every bridge thread answers.
        let running = Atomic<Bool>(true)
        let stopHousekeeping = try EventFD()
        var housekeeping: JoinableThread?
        if notifier.isActive {
            let watchdog = SystemdNotifier.watchdogMicroseconds()
            let interval = Duration.microseconds(Int64(min(watchdog.map { $0 / 2 } ?? 5_000_000, 5_000_000)))
            housekeeping = try JoinableThread(name: "housekeeping") {
                var lastStatus = controller.statusLine // sent with READY=1
                while running.load(ordering: .acquiring) {
                    let stuck = controller.stuckBridges()
                    var status = controller.statusLine
                    if !stuck.isEmpty { status += "; not answering: \(stuck.joined(separator: ", "))" }
                    if watchdog != nil, stuck.isEmpty { notifier.notify("WATCHDOG=1") }
                    if status != lastStatus { notifier.notify("STATUS=" + status); lastStatus = status }
                    _ = stopHousekeeping.wait(until: .now.advanced(by: interval)) {
                        running.load(ordering: .acquiring) ? nil : true
                    }
                }
            }
        }

        while true {
            let signal = Signals.wait(for: [SIGTERM, SIGINT, SIGHUP])
            if signal == SIGHUP {
                if case .success(let report) = controller.reload(from: reloadSource), !report.needsRestart.isEmpty {
                    logger.warning("changed bridges keep their old settings until a restart: \(report.needsRestart)")
                }
                continue
            }
            logger.notice("signal \(signal): stopping")
            break
        }
        notifier.notify("STOPPING=1", "STATUS=stopping: revoking every mapping")
        running.store(false, ordering: .releasing)
        _ = try? stopHousekeeping.signal()
        housekeeping?.join()
        control?.stop()
        controller.stopAll()
        logger.notice("stopped")
    }
}
