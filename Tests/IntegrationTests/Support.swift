import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Logging
import Testing
import TestSupport
import VhostUser


/// Every integration test counts fds or runs a daemon, so they run one at a
/// time (and `make test` runs the suites without parallelism).
@Suite(.serialized) struct Integration {}

func temporarySocketPath(_ name: String) -> String {
    "/tmp/vpb-it-\(getpid())-\(name).sock"
}

/// A bridge serving on its own thread for the duration of a test.
final class RunningBridge {
    let bridge: Bridge
    let thread: JoinableThread
    let path: String

    let peerPath: String

    init(_ name: String, mode: BridgeMode, barSize: UInt64 = 64 * GiB, dmaWindow: BusWindow? = nil,
         staticWindows: [BusWindow] = [], revocationDeadline: Int = 2000, notifications: NotificationMode = .relay,
         mappingBudget: MappingBudget = .process, maxPendingTranslations: Int = BridgeSettings.defaultMaxPendingTranslations,
         configure: (inout BridgeSettings) -> Void = { _ in }) throws {
        // 2 s, not the production 100 ms: tests that expect VM2 to keep up must
        // not fail because a shared machine stalled a thread for a moment.
        path = temporarySocketPath(name)
        peerPath = temporarySocketPath(name + "-peer")
        let space = AddressSpaceConfiguration(barSize: barSize, mode: mode, dmaWindow: dmaWindow, staticWindows: staticWindows)
        var settings = BridgeSettings(name: name, socketPath: path, peerSocketPath: peerPath,
                                      backend: BackendConfiguration(bridgeName: name, addressSpace: space),
                                      revocationDeadlineMilliseconds: revocationDeadline, notifications: notifications)
        settings.maxPendingTranslations = maxPendingTranslations
        configure(&settings)
        let bridge = try Bridge(settings, logger: quietLogger(), mappingBudget: mappingBudget)
        self.bridge = bridge
        thread = try JoinableThread(name: "bridge-\(name)") { bridge.serve() }
    }

    /// Waits (bounded, never asserting on time) until `n` sessions have ended.
    func waitForSessions(_ n: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        let ok = pollUntil { self.bridge.statistics.sessionsServed >= n }
        #expect(ok, "bridge did not finish \(n) session(s)", sourceLocation: sourceLocation)
    }

    func stop() {
        bridge.stop()
        thread.join()
    }
}

/// A bridge with an emulated VM2 (handshake done) and an emulated VM1
/// (device started), all torn down after `body`.
func withTwoGuests(_ name: String, mode: BridgeMode, dmaWindow: BusWindow? = nil, staticWindows: [BusWindow] = [],
                   revocationDeadline: Int = 2000, notifications: NotificationMode = .relay,
                   vm1: VM1Configuration? = nil, vm2: VM2Configuration = VM2Configuration(),
                   _ body: (RunningBridge, EmulatedVM1, EmulatedVM2) throws -> Void) throws {
    let running = try RunningBridge(name, mode: mode, dmaWindow: dmaWindow, staticWindows: staticWindows,
                                    revocationDeadline: revocationDeadline, notifications: notifications)
    defer { running.stop() }
    let device = try connectVM2(running, vm2)
    defer { device.stop() }
    let driver = try EmulatedVM1(socketPath: running.path, configuration: vm1 ?? vm1Config(iommu: mode != .identity))
    defer { driver.disconnect() }
    try driver.start()
    try body(running, driver, device)
}
