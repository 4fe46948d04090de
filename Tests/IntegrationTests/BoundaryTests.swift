import BridgeCore
import BridgeDaemon
import DeviceEngine
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Testing
import TestSupport
import VhostUser
#if canImport(Glibc)
import Glibc
#endif

/// Issue 20 ("the boundary holds, round 3"): a slow, departing or devious
/// peer never takes the daemon down, dodges a kill, or keeps a ring.
extension Integration {
    @Suite struct Boundary {
        /// Writes `bytes` one at a time, `every` apart, until all are out or
        /// the daemon closes the connection; returns how many went out.
        static func drip(_ bytes: [UInt8], on socket: UnixSocket, every: Duration) -> Int {
            var sent = 0
            for byte in bytes {
                guard (try? socket.send([byte])) != nil else { break }
                sent += 1
                // The daemon may already have hung up: stop as soon as it has.
                if let ready = try? Poll.readable([socket.fd.rawValue], timeoutMilliseconds: Int32(every / .milliseconds(1))),
                   ready[0], let m = try? socket.receive(maxBytes: 64, maxFDs: 0, nonBlocking: true), m.bytes.isEmpty {
                    break
                }
            }
            return sent
        }

        /// Hole 1: a VM1 that sends a valid header and then drips the payload
        /// is cut off at its message deadline (2 s) — before, the receive
        /// timeout restarted with every byte and the bridge thread (and its
        /// heartbeat) stayed in that one message for as long as VM1 liked.
        @Test func aVM1ThatDripsAMessageIsCutOffAtItsDeadline() throws {
            let running = try RunningBridge("drip-vm1", mode: .identity)
            defer { running.stop() }
            let vm1 = try UnixSocket.connect(path: running.path)
            defer { try? vm1.fd.close() }
            #expect(pollUntil { running.bridge.statistics.activeSession })
            // SET_FEATURES (2), version 1, 8-byte payload: 3 s at 400 ms a byte.
            let message = [2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0] + [UInt8](repeating: 0, count: 8)
            let heartbeat = running.bridge.heartbeatCount
            let sent = Self.drip(message, on: vm1, every: .milliseconds(400))
            #expect(sent < message.count, "the daemon read the whole dripped message (\(sent) bytes)")
            running.waitForSessions(1)
            let s = running.bridge.statistics
            #expect(s.refusals["message-deadline"] == 1, "\(s.refusals)")
            if case .closedByBridge(let reason)? = s.lastEnd {
                #expect(reason.contains("not complete within 2000 ms"), "\(reason)")
            } else {
                Issue.record("the session ended as \(String(describing: s.lastEnd))")
            }
            #expect(running.bridge.heartbeatCount > heartbeat)
            // The bridge serves the next front end.
            let next = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: false))
            defer { next.disconnect() }
            try next.start()
        }

        /// Hole 1, under systemd: the daemon process with a fake
        /// NOTIFY_SOCKET and WATCHDOG_USEC keeps pinging while a VM1 and a
        /// VM2 drip messages at it (one byte every 1.5 s), and never reports
        /// its bridge as not answering. Before, the bridge thread sat in the
        /// VM1 message for as long as VM1 dripped, its heartbeat stopped, and
        /// the watchdog — and with it systemd — gave up on the whole daemon.
        @Test func theWatchdogKeepsPingingWhileVM1AndVM2Drip() throws {
            let binary = URL(fileURLWithPath: GuestProcess.executable).deletingLastPathComponent()
                .appendingPathComponent("vhost-pci-bridged").path
            let dir = "/tmp/vpb-wd-\(getpid())"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let notify = try UnixSocket.listen(path: "\(dir)/notify.sock", kind: .datagram)
            defer { try? notify.fd.close() }
            try "runtime-directory: \(dir)\ncontrol-socket: \(dir)/control.sock\nbridges:\n  - name: wd\n    bar-size: 1G\n"
                .write(toFile: "\(dir)/config.yaml", atomically: true, encoding: .utf8)
            let daemon = Process()
            daemon.executableURL = URL(fileURLWithPath: binary)
            daemon.arguments = ["--config", "\(dir)/config.yaml", "--log-level", "critical"]
            daemon.environment = ["NOTIFY_SOCKET": "\(dir)/notify.sock", "WATCHDOG_USEC": "1000000"]
            try daemon.run()
            defer { if daemon.isRunning { daemon.terminate() }; daemon.waitUntilExit() }
            /// Every datagram for about `seconds` (or until `until` holds).
            func collect(seconds: Int, until: (String) -> Bool = { _ in false }) -> [String] {
                var got: [String] = []
                for _ in 0..<(seconds * 20) {
                    if let ready = try? Poll.readable([notify.fd.rawValue], timeoutMilliseconds: 50), ready[0],
                       let m = try? notify.receive(maxBytes: 4096, maxFDs: 0) {
                        got.append(String(decoding: m.bytes, as: UTF8.self))
                        if until(got[got.count - 1]) { break }
                    }
                }
                return got
            }
            #expect(collect(seconds: 20) { $0.hasPrefix("READY=1") }.last?.hasPrefix("READY=1") == true)
            let vm1 = try UnixSocket.connect(path: "\(dir)/wd-vm1.sock")
            let vm2 = try UnixSocket.connect(path: "\(dir)/wd-vm2.sock")
            defer { try? vm1.fd.close(); try? vm2.fd.close() }
            let vm1Message = [2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0] + [UInt8](repeating: 0, count: 8)
            let vm2Message = PeerCodec.encode(.hello(PeerHello(features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: NetDevice.served)))
            let sent = Locked((vm1: 0, vm2: 0))
            let drippers = [
                try JoinableThread(name: "drip-vm1") { let n = Self.drip(vm1Message, on: vm1, every: .milliseconds(1500)); sent.withLock { $0.vm1 = n } },
                try JoinableThread(name: "drip-vm2") { let n = Self.drip(vm2Message, on: vm2, every: .milliseconds(1500)); sent.withLock { $0.vm2 = n } },
            ]
            // Longer than the watchdog's allowance ever was (revocation
            // deadline + 5 s): a stalled bridge thread would show here.
            let during = collect(seconds: 12)
            for d in drippers { d.join() }
            let counts = sent.withLock { $0 }
            #expect(counts.vm1 < vm1Message.count && counts.vm2 < vm2Message.count, "dripped \(counts) bytes: not cut off")
            #expect(!during.contains { $0.contains("not answering") }, "\(during.filter { $0.hasPrefix("STATUS") })")
            #expect(during.filter { $0 == "WATCHDOG=1" }.count >= 4, "\(during)")
            // Still pinging after both were cut off, and the bridge serves.
            #expect(collect(seconds: 10) { $0 == "WATCHDOG=1" }.contains("WATCHDOG=1"))
            let next = try EmulatedVM1(socketPath: "\(dir)/wd-vm1.sock", configuration: vm1Config(iommu: false))
            defer { next.disconnect() }
            try next.start()
            kill(daemon.processIdentifier, SIGTERM)
            daemon.waitUntilExit()
            #expect(daemon.terminationStatus == 0)
        }

        /// Hole 3 (last part): a VM2 that drips a frame is disconnected at its
        /// message deadline (1 s) instead of parking the peer thread, counted
        /// under `message-deadline`; the next VM2 gets in.
        @Test func aVM2ThatDripsAFrameIsCutOffAtItsDeadline() throws {
            let running = try RunningBridge("drip-vm2", mode: .identity)
            defer { running.stop() }
            let vm2 = try UnixSocket.connect(path: running.peerPath)
            defer { try? vm2.fd.close() }
            #expect(pollUntil { running.bridge.statistics.peer.connected })
            let hello = PeerCodec.encode(.hello(PeerHello(features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: NetDevice.served)))
            let sent = Self.drip(hello, on: vm2, every: .milliseconds(300))
            #expect(sent < hello.count, "the daemon read the whole dripped HELLO (\(sent) bytes)")
            #expect(pollUntil { !running.bridge.statistics.peer.connected })
            #expect(running.bridge.statistics.peer.refusals["message-deadline"] == 1, "\(running.bridge.statistics.peer.refusals)")
            let next = try RawVM2(running.peerPath)
            #expect(try next.greet() != nil)
        }

        /// Hole 2: with `kill`, a VM2 VMM that hangs up (or breaks the
        /// protocol) instead of acknowledging an UNMAP is killed, and VM1's
        /// invalidate is acknowledged only once the process is gone. The
        /// revocation deadline is a minute, so only the departure can end the
        /// wait: before, the departure counted as "VM2 gone", VM1 was acked at
        /// once and the process lived on with the mapping.
        @Test(arguments: [ChildPeer.Reading.hangsUpAtUnmap, .acksFromTheFutureAtUnmap])
        func aVM2ThatLeavesHoldingARevocationIsKilledBeforeVM1IsAcked(_ how: ChildPeer.Reading) throws {
            try revokeFromAChildVMM("dodge-\(how.rawValue)", revocationDeadline: 60_000, reading: how, lifetimeSeconds: 60) { running, vmm, iova in
                // The VMM is gone by the time VM1 is acked: its exit status is
                // there to collect without waiting.
                #expect(vmm.ended() == .signaled(SIGKILL), "VM1 was acked while the VMM that held the range lived on")
                let s = running.bridge.statistics.peer
                #expect(s.killed == 1 && s.revocationTimeouts == 0, "killed \(s.killed), timeouts \(s.revocationTimeouts)")
                if how == .acksFromTheFutureAtUnmap { #expect(s.refusals["ack-sequence"] == 1, "\(s.refusals), \(s.protocolErrors) protocol errors") }
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
            }
        }

        /// The same through the revocation channel: the bridge thread reads
        /// the ack itself, and when the peer thread ends the connection (VM2
        /// hung up holding an UNMAP record) it waits for the kill and the
        /// VMM's exit before VM1's ack — not only for the session to close.
        @Test func aVM2ThatLeavesHoldingAChannelRevocationIsKilledBeforeVM1IsAcked() throws {
            try revokeFromAChildVMM("dodge-channel", revocationDeadline: 60_000, reading: .hangsUpAtChannelUnmap, lifetimeSeconds: 60,
                                    features: [.sharedRevocations]) { running, vmm, iova in
                #expect(vmm.ended() == .signaled(SIGKILL), "VM1 was acked while the VMM that held the range lived on")
                let s = running.bridge.statistics.peer
                #expect(s.killed == 1 && s.revocationTimeouts == 0, "killed \(s.killed), timeouts \(s.revocationTimeouts)")
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
            }
        }

        /// The attack round's find: a revocation can be a MAP — VM1 lowers a
        /// page's permission (or moves it), and VM2 gets the new MAP — and a
        /// VM2 that hangs up on that MAP is killed before VM1 is acked, like
        /// one that hangs up on an UNMAP. (Before, only UNMAPs counted as
        /// held revocations, and the VMM kept writing through its old mapping.)
        @Test func aVM2ThatLeavesOnARevokingMapIsKilledBeforeVM1IsAcked() throws {
            try revokeFromAChildVMM("dodge-map", revocationDeadline: 60_000, reading: .hangsUpAtRevokingMap, lifetimeSeconds: 60,
                                    revoke: { try $0.update($1, permission: .read) }) { running, vmm, iova in
                #expect(vmm.ended() == .signaled(SIGKILL), "VM1 was acked while the VMM that held write access lived on")
                let s = running.bridge.statistics.peer
                #expect(s.killed == 1 && s.revocationTimeouts == 0, "killed \(s.killed), timeouts \(s.revocationTimeouts)")
                #expect(running.bridge.window.probeInChild(iova, write: true) == .faulted)
            }
        }

        /// A VM2 that leaves with nothing outstanding is not killed (the
        /// `kill` action is for missed revocations, not for hanging up).
        @Test func aVM2ThatLeavesWithNothingOutstandingIsNotKilled() throws {
            let running = try RunningBridge("leave-clean", mode: .iommu, revocationDeadline: 60_000) { $0.vm2DeadlineAction = .kill }
            defer { running.stop() }
            let hello = PeerCodec.encode(.hello(PeerHello(features: [], deviceFeatures: NetDevice.served)))
            let vmm = try ChildPeer.spawn(connectingTo: running.peerPath, hello: hello, lifetimeSeconds: 60, reading: .hangsUpAtUnmap)
            defer { if vmm.ended() == nil { vmm.kill(); _ = vmm.wait() } }
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            // Another VM2 tries to connect meanwhile and is refused (busy):
            // refusing it sends nothing that could be mistaken for a revocation.
            let other = try RawVM2(running.peerPath)
            #expect(try other.expectErrorThenClose()?.code == .busy)
            vmm.kill()
            #expect(vmm.wait() == .signaled(SIGKILL))
            #expect(pollUntil { !running.bridge.statistics.peer.connected })
            #expect(running.bridge.statistics.peer.killed == 0)
        }

        enum RingStopPath: String, CaseIterable, Sendable { case getVringBase, resetDevice, vm1Leaves }

        /// Hole 4: a version-1 VM2 (no `vringStopAck`) is told VRING_STOP on
        /// every path where a ring stops. Before, only a VM2 that answers got
        /// it, so a version-1 VM2 went on processing rings VM1 had stopped.
        @Test(arguments: RingStopPath.allCases)
        func everyRingStopReachesAVersion1VM2(_ path: RingStopPath) throws {
            let running = try RunningBridge("stop-\(path.rawValue)", mode: .identity)
            defer { running.stop() }
            let raw = try RawVM2(running.peerPath)
            #expect(try raw.greet(features: [.translate]) != nil)
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            var config = vm1Config(iommu: false)
            config.protocolFeatures.insert(.resetDevice)
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: config)
            defer { vm1.disconnect() }
            try vm1.start()
            var started: Set<UInt32> = []
            while started.count < 2, let m = try raw.receive() {
                if case .vring(let v) = m { started.insert(v.index) }
            }
            #expect(started == [0, 1])
            switch path {
            case .getVringBase: _ = try vm1.stopDevice()
            case .resetDevice: _ = try vm1.frontend.send(.resetDevice)
            case .vm1Leaves: vm1.disconnect()
            }
            var stopped: Set<UInt32> = []
            while stopped != started, let m = try raw.receive() { // the raw VM2 gives up after 5 s: a missing stop fails
                if case .vringStop(let i) = m { stopped.insert(i) }
            }
            #expect(stopped == started)
            #expect(running.bridge.statistics.peer.protocolErrors == 0)
        }

        /// SET_VRING_ENABLE 0 is not a stop in vhost-user (the ring keeps
        /// its place): every VM2, version 1 too, gets the ring again with the
        /// enabled bit clear, and parks it.
        @Test func aDisabledRingReachesAVersion1VM2() throws {
            let running = try RunningBridge("disable-v1", mode: .identity)
            defer { running.stop() }
            let raw = try RawVM2(running.peerPath)
            #expect(try raw.greet(features: []) != nil)
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: false))
            defer { vm1.disconnect() }
            try vm1.start()
            var enabled: Set<UInt32> = []
            while enabled.count < 2, let m = try raw.receive() {
                if case .vring(let v) = m, v.enabled { enabled.insert(v.index) }
            }
            _ = try vm1.frontend.send(.setVringEnable(VringState(index: 1, num: 0)))
            var disabled: PeerVring?
            while disabled == nil, let m = try raw.receive() {
                if case .vring(let v) = m, v.index == 1, !v.enabled { disabled = v }
            }
            #expect(disabled != nil)
        }

        /// Hole 9: a VM1 that switches a started ring's kick to polling (the
        /// no-fd bit) tells VM2 — the ring again, without a kick fd, so VM2
        /// polls it — instead of silently ending its kicks; and back.
        @Test func aKickSwitchedToPollingIsToldToVM2() throws {
            let running = try RunningBridge("kick-poll", mode: .identity)
            defer { running.stop() }
            let raw = try RawVM2(running.peerPath)
            #expect(try raw.greet() != nil)
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: false))
            defer { vm1.disconnect() }
            try vm1.start()
            // The ring may be sent more than once as it starts (start, enable):
            // read until its kick fd is there, or gone, as expected.
            func vring(_ index: UInt32, kick: Bool) throws -> PeerVring? {
                while let m = try raw.receive() { if case .vring(let v) = m, v.index == index, v.hasKick == kick { return v } }
                return nil
            }
            #expect(try vring(1, kick: true) != nil)
            _ = try vm1.frontend.send(.setVringKick(VringFileRef(index: 1, noFD: true)))
            let polling = try vring(1, kick: false) // the raw VM2 gives up after 5 s: before, nothing came
            #expect(polling?.hasCall == true, "\(String(describing: polling))")
            let kick = try EventFD()
            defer { try? kick.fd.close() }
            _ = try vm1.frontend.send(.setVringKick(VringFileRef(index: 1, noFD: false)), fds: [kick.fd.rawValue])
            #expect(try vring(1, kick: true) != nil)
        }

        /// Hole 9: a VM2 that reconnects the instant it closed is never
        /// refused as `busy` (its old connection's end was simply not read yet).
        @Test func aVM2ThatReconnectsAtOnceIsNeverBusy() throws {
            let running = try RunningBridge("reconnect", mode: .identity)
            defer { running.stop() }
            var busy = 0
            for _ in 0..<150 {
                let raw = try RawVM2(running.peerPath)
                try raw.send(.hello(PeerHello(features: PeerFeatures.all.subtracting(.sharedRevocations), deviceFeatures: NetDevice.served)))
                var greeted = false
                while !greeted, let m = try raw.receive() {
                    if case .helloReply = m { greeted = true }
                    if case .error(let e) = m, e.code == .busy { busy += 1; break }
                }
                try raw.socket.fd.close()
            }
            #expect(busy == 0, "\(busy) of 150 reconnects were refused as busy")
        }
    }
}
