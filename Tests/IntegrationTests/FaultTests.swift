import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// An emulated guest as its own process (`vhost-pci-guest`, built by
/// `swift build`), so it can be SIGKILLed like a crashing VMM.
final class GuestProcess {
    let process = Process()

    static var executable: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent(".build/debug/vhost-pci-guest").path
    }

    init(_ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: Self.executable)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
    }

    /// Foundation's Process keeps a monitoring thread and its fds (run loop,
    /// socketpair) from the first child on: start one before a test takes
    /// its fd baseline, so only the daemon's fds are counted.
    static func warmUp() throws {
        let p = try GuestProcess(["--help"])
        p.process.waitUntilExit()
    }

    func killHard() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { killHard() }
}

/// The daemon binary (built by `swift build`) with a config of one bridge.
final class DaemonProcess {
    let process = Process()
    let dir: String
    var vm1Path: String { "\(dir)/f-vm1.sock" }
    var vm2Path: String { "\(dir)/f-vm2.sock" }

    init(dir: String, mode: String) throws {
        self.dir = dir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nlog-level: critical\nbridges:\n  - name: f\n    bar-size: 64G\n    mode: \(mode)\n    revocation-deadline-ms: 2000\n"
            .write(toFile: "\(dir)/config.yaml", atomically: true, encoding: .utf8)
        process.executableURL = URL(fileURLWithPath: URL(fileURLWithPath: GuestProcess.executable).deletingLastPathComponent()
            .appendingPathComponent("vhost-pci-bridged").path)
        process.arguments = ["--config", "\(dir)/config.yaml"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Listening, not just present: a killed daemon leaves its socket files.
        let control = "\(dir)/control.sock"
        let listening = pollUntil { Self.accepts(control) }
        #expect(listening)
    }

    static func accepts(_ path: String) -> Bool {
        guard let s = try? UnixSocket.connect(path: path) else { return false }
        try? s.fd.close()
        return true
    }

    func signal(_ s: Int32) {
        if process.isRunning { kill(process.processIdentifier, s) }
        process.waitUntilExit()
    }

    deinit { signal(SIGKILL) }
}

extension Integration {
    /// Faults, each checked for what a daemon guarding memory owes: no crash,
    /// no leaked fd, no stale mapping (in the daemon's window and in VM2's),
    /// and another bridge in the same daemon moving packets throughout.
    @Suite struct Faults {
        /// VM1's VMM dies (SIGKILL) with packets in flight: the session ends,
        /// every fd it brought is closed, its memory is gone from both
        /// windows, and the bridge takes the next VM1.
        @Test func vm1KilledMidTraffic() throws {
            try withTwoGuests("fault-bystander-1", mode: .identity) { _, bystanderVM1, _ in
                let running = try RunningBridge("fault-vm1", mode: .identity)
                defer { running.stop() }
                let vm2 = try connectVM2(running)
                defer { vm2.stop() }
                #expect(pollUntil { vm2.statistics.ready })
                try GuestProcess.warmUp()
                #expect(try bystanderVM1.runTraffic(count: 10, sizes: [64]).completed)
                _ = settledOpenFileDescriptorCount()
                let before = openFileDescriptorTable()
                let vm1 = try GuestProcess(["vm1", "--socket-path", running.path, "--count", "10000000", "--sizes", "64,1500"])
                #expect(pollUntil { vm2.statistics.packetsReceived >= 2000 }, "\(vm2.statistics)")
                #expect(vm2.window?.probeInChild(BusAddress(0x10_0000)) == .accessible, "VM1's RAM is in VM2's BAR while VM1 lives")
                vm1.killHard()
                running.waitForSessions(1)
                #expect(pollUntil { fdsOpenedSince(before).isEmpty }, "the session's fds are all closed: \(fdsOpenedSince(before))")
                #expect(running.bridge.window.probeInChild(BusAddress(0x10_0000)) == .faulted)
                #expect(pollUntil { vm2.statistics.bytesMapped == 0 })
                #expect(vm2.window?.probeInChild(BusAddress(0x10_0000)) == .faulted, "revoked from VM2 too")
                #expect(try bystanderVM1.runTraffic(count: 100, sizes: [64, 1500]).completed, "the other bridge kept going")
                // And the bridge serves the next VM1.
                let next = try EmulatedVM1(socketPath: running.path)
                defer { next.disconnect() }
                try next.start()
                #expect(try next.runTraffic(count: 50, sizes: [256]).completed)
            }
        }

        /// SIGTERM during traffic: the daemon revokes everything from VM2
        /// (UNMAPs, acknowledged) before it exits, and removes its sockets.
        @Test func daemonSIGTERMDuringTrafficUnmapsVM2First() throws {
            let dir = "/tmp/vpb-fault-term-\(getpid())"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let daemon = try DaemonProcess(dir: dir, mode: "iommu")
            let vm2 = try EmulatedVM2(peerSocketPath: daemon.vm2Path)
            defer { vm2.stop() }
            let vm1 = try EmulatedVM1(socketPath: daemon.vm1Path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            #expect(try vm1.runTraffic(count: 200, sizes: [64, 1500]).completed)
            #expect(vm2.statistics.bytesMapped > 0)
            var terminated = false
            _ = try? vm1.runTraffic(count: 100_000, sizes: [64, 1500], idleLimit: 10, progress: { _ in
                if !terminated { daemon.signal(SIGTERM); terminated = true }
            })
            if !terminated { daemon.signal(SIGTERM) }
            #expect(daemon.process.terminationStatus == 0)
            #expect(pollUntil { vm2.isFinished })
            #expect(vm2.statistics.bytesMapped == 0 && vm2.statistics.unmapsApplied > 0 && vm2.statistics.disconnectReason != nil,
                    "everything was revoked from VM2 before the daemon left: \(vm2.statistics)")
            #expect(!FileManager.default.fileExists(atPath: daemon.vm1Path) && !FileManager.default.fileExists(atPath: daemon.vm2Path))
        }

        /// Issue 20, hole 7: VM1 clears `O_NONBLOCK` on its kick and call
        /// eventfds (file descriptions it shares with the daemon) after the
        /// rings started, and fills its call counters, while VM2 rings
        /// doorbells. Traffic flows once VM1 drains them, the session's end
        /// removes its relay links and closes their fds, and SIGTERM ends
        /// the daemon, with a doorbell waiting for a full counter each time.
        @Test func vm1WithBlockingFullEventfdsCannotStallTheRelayOrSIGTERM() throws {
            let dir = "/tmp/vpb-fault-blocking-\(getpid())"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let daemon = try DaemonProcess(dir: dir, mode: "identity")
            let pid = daemon.process.processIdentifier
            let vm2 = try EmulatedVM2(peerSocketPath: daemon.vm2Path)
            defer { vm2.stop() }
            #expect(pollUntil { vm2.statistics.ready })
            let idle = settledFDCount(of: pid)
            /// Blocking eventfds, call counters full, and doorbells VM2 rang since.
            func blockAndFill(_ vm1: EmulatedVM1) throws {
                for q in vm1.queues {
                    // Filled while non-blocking, so the test itself never waits.
                    try q.call.fd.setNonBlocking(true)
                    _ = EventFD.take(from: q.call.fd.rawValue)
                    _ = try q.call.signal(0xffff_ffff_ffff_fffe)
                    try q.kick.fd.setNonBlocking(false)
                    try q.call.fd.setNonBlocking(false)
                }
                let rung = vm2.statistics.notificationsSent
                try vm1.postReceiveBuffers(8)
                for i in 0..<8 { _ = try vm1.send(TestPacket.make(sequence: UInt32(i), size: 64)) }
                #expect(pollUntil { vm2.statistics.notificationsSent > rung }, "VM2 rang doorbells: \(vm2.statistics)")
            }
            do {
                let vm1 = try EmulatedVM1(socketPath: daemon.vm1Path)
                try vm1.start()
                #expect(try vm1.runTraffic(count: 100, sizes: [64, 1500]).completed)
                try blockAndFill(vm1)
                // runTraffic reads the call counters when it idles: VM1 drains.
                let after = try vm1.runTraffic(count: 200, sizes: [64, 1500])
                #expect(after.received >= 200 && after.corrupt == 0, "traffic flows after VM1 drained: \(after)")
                try blockAndFill(vm1)
                vm1.disconnect()
            }
            #expect(pollUntil(seconds: 60) { fdCount(of: pid) == idle }, "the session's links were removed and their fds closed")
            let vm1 = try EmulatedVM1(socketPath: daemon.vm1Path)
            defer { vm1.disconnect() }
            try vm1.start()
            #expect(try vm1.runTraffic(count: 100, sizes: [64, 1500]).completed)
            try blockAndFill(vm1)
            kill(pid, SIGTERM)
            let ended = pollUntil(seconds: 60) { !daemon.process.isRunning }
            #expect(ended, "SIGTERM ended the daemon")
            if !ended {
                for q in vm1.queues { _ = EventFD.take(from: q.call.fd.rawValue) } // let it go
                daemon.signal(SIGKILL)
            }
            daemon.process.waitUntilExit()
            #expect(daemon.process.terminationReason == .exit && daemon.process.terminationStatus == 0)
        }

        /// SIGKILL (no cleanup at all), then a restart on the same sockets:
        /// VM1 and VM2 reconnect as QEMU's `reconnect=` and a VM2 VMM would,
        /// and traffic flows again; nothing of the first run stays in this
        /// process (VM2's window is gone with its connection).
        @Test func daemonSIGKILLAndRestartWithGuestsReconnecting() throws {
            let dir = "/tmp/vpb-fault-kill-\(getpid())"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try GuestProcess.warmUp()
            _ = settledOpenFileDescriptorCount()
            let before = openFileDescriptorTable()
            do {
                let first = try DaemonProcess(dir: dir, mode: "identity")
                let vm2 = try EmulatedVM2(peerSocketPath: first.vm2Path)
                let vm1 = try EmulatedVM1(socketPath: first.vm1Path)
                try vm1.start()
                #expect(try vm1.runTraffic(count: 100, sizes: [64, 1500]).completed)
                first.signal(SIGKILL)
                #expect(pollUntil { vm2.isFinished && vm2.window == nil }, "VM2 dropped its BAR with the connection")
                vm1.disconnect()
                vm2.stop()
                #expect(FileManager.default.fileExists(atPath: first.vm1Path), "a killed daemon leaves its sockets")
            }
            do {
                let second = try DaemonProcess(dir: dir, mode: "identity") // takes over the stale sockets
                let vm2 = try EmulatedVM2(peerSocketPath: second.vm2Path)
                defer { vm2.stop() }
                let vm1 = try EmulatedVM1(socketPath: second.vm1Path)
                defer { vm1.disconnect() }
                try vm1.start()
                #expect(try vm1.runTraffic(count: 200, sizes: [64, 1500, 9000]).completed)
                #expect(vm2.statistics.descriptorsRefused == 0)
                second.signal(SIGTERM)
                #expect(second.process.terminationStatus == 0)
            }
            #expect(pollUntil { fdsOpenedSince(before).isEmpty }, "\(fdsOpenedSince(before))")
        }

        /// The daemon's RLIMIT_NOFILE lowered (prlimit) while VM1 sessions
        /// connect: each is refused when its fds cannot arrive (MSG_CTRUNC),
        /// with the reason, nothing of it is left open, VM2 stays connected,
        /// and once the limit is back a session runs traffic.
        @Test func openFileLimitLoweredWhileSessionsConnect() throws {
            let dir = "/tmp/vpb-fault-nofile-\(getpid())"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let daemon = try DaemonProcess(dir: dir, mode: "identity")
            let pid = daemon.process.processIdentifier
            let vm2 = try EmulatedVM2(peerSocketPath: daemon.vm2Path)
            defer { vm2.stop() }
            #expect(pollUntil { vm2.window != nil })
            let idle = settledFDCount(of: pid)
            let original = try ResourceLimits.setOpenFilesSoftLimit(UInt64(idle + 3), process: pid)
            var refused = 0
            for _ in 0..<3 {
                let vm1 = try EmulatedVM1(socketPath: daemon.vm1Path)
                do { try vm1.start() } catch { refused += 1 }
                vm1.disconnect()
                #expect(pollUntil { fdCount(of: pid) == idle }, "the refused session left fds open in the daemon")
            }
            #expect(refused == 3, "a session cannot start with 3 fds to spare")
            #expect(daemon.process.isRunning && vm2.window != nil, "the daemon and VM2 survived")
            try ResourceLimits.setOpenFilesSoftLimit(original, process: pid)
            do {
                let vm1 = try EmulatedVM1(socketPath: daemon.vm1Path)
                try vm1.start()
                #expect(try vm1.runTraffic(count: 100, sizes: [64, 1500]).completed)
                vm1.disconnect()
            }
            #expect(pollUntil { fdCount(of: pid) == idle })
            daemon.signal(SIGTERM)
            #expect(daemon.process.terminationStatus == 0)
        }

        /// `vm.max_map_count` reached, in a process of its own (the filler
        /// takes every VMA it may have): a grant is refused and shows nothing,
        /// a partial revocation (which needs a VMA split the kernel refuses)
        /// revokes the whole window instead of failing, and once VMAs are free
        /// again grants work.
        @Test func mapCountLimitRefusesGrantsButNeverARevocation() throws {
            let output = Pipe()
            let process = Process()
            process.executableURL = URL(fileURLWithPath: GuestProcess.executable)
            process.arguments = ["map-limit"]
            process.standardOutput = output
            process.standardError = FileHandle.nullDevice
            try process.run()
            let data = output.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            try #require(process.terminationStatus == 0, "\(String(decoding: data, as: UTF8.self))")
            let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
            #expect((report["vmasFilled"] as? Int ?? 0) > 1000, "the filler reached the limit by splitting: \(report)")
            #expect((report["grantAtLimit"] as? String)?.contains("Cannot allocate memory") == true, "\(report)")
            #expect(report["grantAtLimitFaults"] as? Bool == true)
            #expect(report["partialRevokeAtLimit"] as? String == "whole window")
            #expect(report["pagesAfterRevoke"] as? [String] == ["faulted", "faulted", "faulted"], "nothing of the partly revoked grant stays visible")
            #expect(report["grantAfterRelease"] as? String == "granted")
            #expect(report["readAfterRelease"] as? Bool == true)
        }

        /// VM2's VMM dies (SIGKILL) with packets in flight: the daemon drops
        /// it, VM1 stays connected, a new VM2 resumes the rings where the
        /// dead one completed them, and nothing leaks.
        @Test func vm2KilledMidTraffic() throws {
            try withTwoGuests("fault-bystander-2", mode: .iommu) { _, bystanderVM1, _ in
                let running = try RunningBridge("fault-vm2", mode: .iommu)
                defer { running.stop() }
                try GuestProcess.warmUp()
                // The bystander makes its lazy fds (a read-only reopening of
                // its VM1's memory, made on the first read grant) before the baseline.
                #expect(try bystanderVM1.runTraffic(count: 10, sizes: [64]).completed)
                _ = settledOpenFileDescriptorCount()
                let before = openFileDescriptorTable()
                let vm2 = try GuestProcess(["vm2", "--peer-socket", running.peerPath, "--duration", "120"])
                #expect(pollUntil { running.bridge.statistics.peer.ready })
                weak var released: EmulatedVM1?
                do {
                    let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
                    released = vm1
                    try vm1.start()
                    var killed = false
                    let first = try vm1.runTraffic(count: 100_000, sizes: [64, 1500], idleLimit: 20, progress: { progress in
                        if !killed, progress.received >= 300 { vm2.killHard(); killed = true }
                    })
                    #expect(killed && !first.completed, "\(first)")
                    #expect(pollUntil { !running.bridge.statistics.peer.connected })
                    #expect(try bystanderVM1.runTraffic(count: 100, sizes: [64]).completed, "the other bridge kept going")
                    let again = try connectVM2(running)
                    // The new VM2 resumes where the dead one completed: what was in
                    // flight arrives too (received > sent), then traffic is exact.
                    let second = try vm1.runTraffic(count: 200, sizes: [64, 1500])
                    #expect(second.received >= 200 && second.corrupt == 0, "\(second); VM2 \(again.statistics)")
                    let third = try vm1.runTraffic(count: 100, sizes: [64, 1500])
                    #expect(third.completed && third.corrupt == 0, "\(third)")
                    #expect(again.statistics.descriptorsRefused == 0 && again.statistics.lastError == nil, "\(again.statistics)")
                    again.stop()
                    vm1.disconnect()
                    running.waitForSessions(1)
                }
                #expect(released == nil, "VM1 (and its RAM memfd) was freed")
                #expect(pollUntil { !running.bridge.statistics.peer.connected })
                #expect(pollUntil { fdsOpenedSince(before).isEmpty }, "nothing of either VM2 or the session is left: \(fdsOpenedSince(before))")
                #expect(running.bridge.window.probeInChild(BusAddress(vm1Config(iommu: true).dmaWindow.base.rawValue)) == .faulted)
            }
        }
    }
}

/// How many fds process `pid` has open.
func fdCount(of pid: Int32) -> Int {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count
}

/// `fdCount(of:)` once two readings 50 ms apart agree (bounded).
func settledFDCount(of pid: Int32) -> Int {
    var last = fdCount(of: pid)
    for _ in 0..<100 {
        usleep(50_000)
        let now = fdCount(of: pid)
        if now == last { return now }
        last = now
    }
    return last
}

/// This process's fds: number → what it points at. An entry whose link
/// cannot be read was closed while the directory was read: the listing's own
/// directory fd always is, and it takes whatever number is lowest free, so
/// counting it would report a "new" fd whenever an fd below it closed.
func openFileDescriptorTable() -> [String: String] {
    var out: [String: String] = [:]
    for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
        if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)") { out[name] = target }
    }
    return out
}

/// The fds open now that were not open (as the same thing) at `before`: a
/// leak shows here, while fds of Foundation's own child-process machinery,
/// which come and go on their own schedule, only ever disappear.
func fdsOpenedSince(_ before: [String: String]) -> [String: String] {
    var fresh: [String: String] = [:]
    for (number, target) in openFileDescriptorTable() where before[number] != target { fresh[number] = target }
    return fresh
}
