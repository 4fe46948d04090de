import BridgeCore
import DeviceEngine
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Testing
import TestSupport
import VhostUser

extension Interop {
    @Suite struct DPDK {
        @Test(.enabled(if: Peers.hasTestpmd, Comment(rawValue: Peers.testpmdMissing)))
        func testpmdTxonlyFramesReachVM2InPlace() throws {
            let b = try InteropBridge("tpmd-tx", mode: .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let pmd = try testpmd(b.path, mode: "txonly", name: "tx")
            let flowed = pollUntil(seconds: 60, everyMilliseconds: 10) { vm2.statistics.framesValid >= 10_000 }
            let s = vm2.statistics // before the front end goes away (then VM2 refuses what it unmapped)
            pmd.stop()
            #expect(flowed, "VM2 saw \(s.framesValid) frames; testpmd said:\n\(pmd.output.suffix(1500))")
            #expect(s.framesInvalid == 0 && s.packetsCorrupt == 0 && s.descriptorsRefused == 0)
            #expect(pollUntil(seconds: 10, everyMilliseconds: 10) { b.bridge.statistics.sessionsServed == 1 })
            let log = b.bridge.statistics.lastRequestLog
            print("testpmd message sequence: \(log.map(\.description).joined(separator: " "))")
            #expect(log.first == .getFeatures || log.first == .setOwner)
            #expect(log.contains(.setMemTable) && log.contains(.setVringKick))
            #expect(b.bridge.statistics.refusals.isEmpty, "refused: \(b.bridge.statistics.refusals)")
        }

        /// testpmd with two queue pairs against the default configuration:
        /// frames arrive on both transmit queues, VM2 polls (testpmd is told
        /// not to kick), nothing is refused.
        @Test(.enabled(if: Peers.hasTestpmd, Comment(rawValue: Peers.testpmdMissing)))
        func testpmdWithTwoQueuePairs() throws {
            let b = try InteropBridge("tpmd-mq", mode: .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.dataPath = .count
            config.pollFor = .milliseconds(50)
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let pmd = try testpmd(b.path, mode: "txonly", name: "mq", queues: 2)
            let flowed = pollUntil(seconds: 60, everyMilliseconds: 10) {
                let per = vm2.statistics.receivedPerQueuePair
                return per.count >= 2 && per[0] >= 10_000 && per[1] >= 10_000
            }
            let s = vm2.statistics
            let features = b.bridge.statistics.session?.ackedFeatures ?? 0
            pmd.stop()
            #expect(flowed, "VM2 saw \(s.receivedPerQueuePair) per queue pair; testpmd said:\n\(pmd.output.suffix(1500))")
            #expect(s.framesInvalid == 0 && s.descriptorsRefused == 0, "\(s.refusalReasons)")
            #expect(b.bridge.statistics.refusals.isEmpty, "refused: \(b.bridge.statistics.refusals)")
            #expect(features & VirtioNetFeatures.mq.rawValue != 0, "testpmd negotiated MQ")
        }

        @Test(.enabled(if: Peers.hasTestpmd, Comment(rawValue: Peers.testpmdMissing)))
        func vm2FillsTestpmdsReceiveBuffers() throws {
            let b = try InteropBridge("tpmd-rx", mode: .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            config.generateFrames = 20_000
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let pmd = try testpmd(b.path, mode: "rxonly", name: "rx")
            let sent = pollUntil(seconds: 60, everyMilliseconds: 10) { vm2.statistics.packetsSent >= 20_000 }
            usleep(1_000_000) // let testpmd poll what is still in its ring (a loaded machine is slow to)
            pmd.stop()
            let received = testpmdCount(pmd.output, "RX-packets") ?? -1
            #expect(sent, "VM2 wrote \(vm2.statistics.packetsSent) frames")
            // Two windows testpmd cannot count, each at most one RX ring: frames
            // VM2 wrote before testpmd zeroed its counters at forwarding start,
            // and frames still in the ring when it stopped. The ring size is the
            // driver's choice (testpmd asks for 0 descriptors), so allow the
            // largest virtio ring testpmd's virtio-user gets, 1024, per window.
            // CI runs under load lost 576, then 1 152.
            #expect(received >= 20_000 - 2 * 1024, "testpmd counted \(received); output:\n\(pmd.output.suffix(1500))")
        }

        @Test(.enabled(if: Peers.hasTestpmd, Comment(rawValue: Peers.testpmdMissing)))
        func testpmdKilledAndRestarted() throws {
            let b = try InteropBridge("tpmd-restart", mode: .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let first = try testpmd(b.path, mode: "txonly", name: "r1")
            #expect(pollUntil(seconds: 60, everyMilliseconds: 10) { vm2.statistics.framesValid >= 1000 })
            first.kill() // no goodbye
            #expect(pollUntil(seconds: 10, everyMilliseconds: 10) { b.bridge.statistics.sessionsServed == 1 && b.bridge.statistics.session == nil })
            let before = vm2.statistics.framesValid
            let second = try testpmd(b.path, mode: "txonly", name: "r2")
            #expect(pollUntil(seconds: 60, everyMilliseconds: 10) { vm2.statistics.framesValid >= before + 1000 }, "\(second.output.suffix(1000))")
            #expect(vm2.statistics.descriptorsRefused == 0, "\(vm2.statistics.refusalReasons)")
            second.stop()
        }
    }

    @Suite struct QEMU {
        private func dhcpReachesVM2(iommu: Bool) throws {
            let b = try InteropBridge(iommu ? "qemu-iommu" : "qemu", mode: iommu ? .iommu : .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let vm = try qemu(b.path, iommu: iommu, name: iommu ? "q-iommu" : "q-ident")
            defer { vm.kill() }
            // iPXE in SeaBIOS brings the NIC up and sends DHCP DISCOVERs after a few seconds of TCG.
            let ok = pollUntil(seconds: 120, everyMilliseconds: 10) { vm2.statistics.framesValid >= 1 }
            let s = vm2.statistics
            #expect(ok, "no frame from iPXE reached VM2: \(s); QEMU said: \(vm.output.suffix(800))")
            #expect(s.framesInvalid == 0 && s.descriptorsRefused == 0)
            let stats = b.bridge.statistics
            #expect(stats.refusals.isEmpty, "refused: \(stats.refusals)")
            vm.kill()
            _ = pollUntil(seconds: 10, everyMilliseconds: 10) { b.bridge.statistics.sessionsServed >= 1 }
            let after = b.bridge.statistics
            print("QEMU\(iommu ? " + intel-iommu" : "") message sequence: \(after.lastRequestLog.map(\.description).joined(separator: " "))")
            print("QEMU\(iommu ? " + intel-iommu" : "") misses sent \(after.iotlbMissesSent), IOTLB updates \(after.iotlbUpdates), invalidates \(after.iotlbInvalidates), VM2 translations granted \(after.peer.translationsGranted), refused \(after.peer.translationsRefused), VM2 frames \(vm2.statistics.framesValid)")
            if iommu {
                // Only IOTLB-mapped ranges are visible; VM2's translations raised misses QEMU answered.
                #expect(stats.iotlbUpdates >= 1 || stats.session.map { $0.mappings > 0 } == true)
                #expect(stats.session?.ackedFeatures.map { $0 & FeatureBit.iommuPlatform != 0 } == true)
            }
        }

        @Test(.enabled(if: Peers.hasQEMU, Comment(rawValue: Peers.qemuMissing)))
        func iPXEFramesReachVM2WithoutAVIOMMU() throws { try dhcpReachesVM2(iommu: false) }

        /// QEMU with `queues=4` and `mq=on`: it checks GET_QUEUE_NUM, sets up
        /// the pairs the guest uses (iPXE: the first) and leaves the rest
        /// disabled; nothing is refused and frames flow.
        @Test(.enabled(if: Peers.hasQEMU, Comment(rawValue: Peers.qemuMissing)))
        func iPXEFramesReachVM2WithFourQueuePairs() throws {
            let b = try InteropBridge("qemu-mq", mode: .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let vm = try qemu(b.path, iommu: false, name: "q-mq", queues: 4)
            defer { vm.kill() }
            let ok = pollUntil(seconds: 120, everyMilliseconds: 10) { vm2.statistics.framesValid >= 1 }
            let s = vm2.statistics
            #expect(ok, "no frame from iPXE reached VM2: \(s); QEMU said: \(vm.output.suffix(800))")
            #expect(s.framesInvalid == 0 && s.descriptorsRefused == 0)
            #expect(b.bridge.statistics.refusals.isEmpty, "refused: \(b.bridge.statistics.refusals)")
            vm.kill()
            _ = pollUntil(seconds: 10, everyMilliseconds: 10) { b.bridge.statistics.sessionsServed >= 1 }
            print("QEMU queues=4 message sequence: \(b.bridge.statistics.lastRequestLog.map(\.description).joined(separator: " "))")
        }

        @Test(.enabled(if: Peers.hasQEMU, Comment(rawValue: Peers.qemuMissing)))
        func iPXEFramesReachVM2ThroughIntelIOMMU() throws { try dhcpReachesVM2(iommu: true) }

        /// A guest reset under intel-iommu: QEMU stops the device, flushes its
        /// IOTLB (invalidates the daemon must revoke, never refuse) and starts
        /// it again; frames flow again and nothing is refused.
        @Test(.enabled(if: Peers.hasQEMU, Comment(rawValue: Peers.qemuMissing)))
        func guestResetUnderIntelIOMMU() throws {
            let b = try InteropBridge("qemu-reset", mode: .iommu)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let qmpPath = "/tmp/vpb-interop-\(getpid())-qmp.sock"
            let vm = try qemu(b.path, iommu: true, name: "q-reset", qmpPath: qmpPath)
            defer { vm.kill(); unlink(qmpPath) }
            #expect(pollUntil(seconds: 120, everyMilliseconds: 10) { vm2.statistics.framesValid >= 1 }, "\(vm.output.suffix(800))")
            let before = vm2.statistics.framesValid
            try qmp(qmpPath, ["system_reset"])
            #expect(pollUntil(seconds: 120, everyMilliseconds: 10) { vm2.statistics.framesValid > before }, "no frame after the reset: \(vm2.statistics)")
            let s = b.bridge.statistics
            print("QEMU reset under intel-iommu: refusals \(s.refusals), VM2 unmaps \(vm2.statistics.unmapsApplied), updates \(s.iotlbUpdates)")
            #expect(s.refusals.isEmpty, "refused: \(s.refusals)")
            #expect(vm2.statistics.descriptorsRefused == 0, "\(vm2.statistics.refusalReasons)")
        }

        @Test(.enabled(if: Peers.hasQEMU, Comment(rawValue: Peers.qemuMissing)))
        func daemonRestartsWhileQEMUWaitsWithReconnect() throws {
            let path = "/tmp/vpb-interop-\(getpid())-reconnect.sock"
            var b = try InteropBridge("reconnect", mode: .identity, path: path)
            let vm = try qemu(path, iommu: false, name: "q-reconnect", chardevOptions: ",reconnect=1")
            defer { vm.kill() }
            #expect(pollUntil(seconds: 120, everyMilliseconds: 10) { b.bridge.statistics.session?.startedRings.isEmpty == false },
                    "QEMU never started the rings: \(vm.output.suffix(800))")
            b.stop() // the daemon goes away under a running VM
            b = try InteropBridge("reconnect", mode: .identity, path: path)
            defer { b.stop() }
            #expect(pollUntil(seconds: 60, everyMilliseconds: 10) { b.bridge.statistics.session?.startedRings.isEmpty == false },
                    "QEMU did not reconnect and restart the device: \(vm.output.suffix(800))")
        }

        @Test(.enabled(if: Peers.hasQEMU, Comment(rawValue: Peers.qemuMissing)))
        func clientModeAgainstAQEMUServerSocket() throws {
            let path = "/tmp/vpb-interop-\(getpid())-server.sock"
            let vm = try qemu(path, iommu: false, name: "q-server", chardevOptions: ",server=on")
            defer { vm.kill() }
            #expect(pollUntil(seconds: 30, everyMilliseconds: 10) { FileManager.default.fileExists(atPath: path) })
            var b = try InteropBridge("client", mode: .identity, client: true, path: path)
            #expect(pollUntil(seconds: 120, everyMilliseconds: 10) { b.bridge.statistics.session?.startedRings.isEmpty == false },
                    "no device start over the client connection: \(vm.output.suffix(800))")
            b.stop() // restart the back end; QEMU keeps its socket
            b = try InteropBridge("client", mode: .identity, client: true, path: path)
            defer { b.stop() }
            #expect(pollUntil(seconds: 60, everyMilliseconds: 10) { b.bridge.statistics.session?.startedRings.isEmpty == false },
                    "QEMU did not restart the device for the reconnected back end: \(vm.output.suffix(800))")
        }
    }
}

extension Interop {
    /// Debian's cloud kernel as VM1 (busybox initramfs, QEMU TCG) sending UDP
    /// through its virtio-net driver: VM2 checks every byte of every datagram
    /// in place, the daemon refuses nothing, and under intel-iommu in strict
    /// mode every unmap is a synchronous revocation through VM2 — with no
    /// DMAR fault in the guest.
    @Suite struct LinuxGuestSuite {
        private func guestSends(iommu: Bool) throws {
            let b = try InteropBridge(iommu ? "linux-iommu" : "linux", mode: iommu ? .iommu : .identity)
            defer { b.stop() }
            var config = VM2Configuration()
            config.echo = false
            let vm2 = try EmulatedVM2(peerSocketPath: b.peerPath, configuration: config)
            defer { vm2.stop() }
            let count = iommu ? 2000 : 5000
            let vm = try External(Peers.qemu, LinuxGuest.qemuArguments(socket: b.path, iommu: iommu, count: count, size: 512),
                                  name: iommu ? "linux-iommu" : "linux")
            defer { vm.kill() }
            var acked: UInt64 = 0 // what the guest negotiated, seen while the session lives
            let finished = pollUntil(seconds: 180, everyMilliseconds: 20) {
                if let f = b.bridge.statistics.session?.ackedFeatures { acked = f }
                return LinuxGuest.report(in: vm.output) != nil || !vm.process.isRunning
            }
            let report = LinuxGuest.report(in: vm.output)
            #expect(finished, "the guest did not finish: \(vm.output.suffix(1500))")
            #expect(report?.sent == count, "\(vm.output.suffix(800))")
            #expect(pollUntil(seconds: 10, everyMilliseconds: 10) { vm2.statistics.packetsVerified >= count },
                    "VM2 verified \(vm2.statistics.packetsVerified) of \(count)")
            let s = vm2.statistics
            let stats = b.bridge.statistics
            vm.kill()
            #expect(s.packetsCorrupt == 0 && s.framesInvalid == 0 && s.descriptorsRefused == 0, "\(s.refusalReasons)")
            #expect(s.packetsVerified == count, "every datagram once")
            #expect(report?.dmarFaults == 0, "the guest logged DMAR faults")
            #expect(stats.refusals.isEmpty, "refused: \(stats.refusals)")
            print("Linux guest\(iommu ? " + intel-iommu strict" : ""): \(report.map { "\($0.packetsPerSecond)" } ?? "?") datagrams/s, "
                  + "misses \(stats.iotlbMissesSent) (\(String(format: "%.2f", Double(stats.iotlbMissesSent) / Double(count))) per datagram), "
                  + "invalidates \(stats.iotlbInvalidates), EVENT_IDX \(acked & VirtioNetFeatures.eventIdx.rawValue != 0), "
                  + "MRG_RXBUF \(acked & VirtioNetFeatures.mrgRxbuf.rawValue != 0)")
            #expect(acked & VirtioNetFeatures.eventIdx.rawValue != 0 && acked & VirtioNetFeatures.mrgRxbuf.rawValue != 0,
                    "Linux negotiates what the default bridge offers: the engine served EVENT_IDX and MRG_RXBUF")
            if iommu {
                #expect(stats.iotlbInvalidates >= count, "strict mode unmaps every buffer")
                #expect(stats.iotlbMissesSent <= count + count / 10, "about one miss per datagram")
            }
        }

        @Test(.enabled(if: Peers.hasLinuxGuest, Comment(rawValue: Peers.linuxGuestMissing)))
        func udpFromALinuxGuestWithoutAVIOMMU() throws { try guestSends(iommu: false) }

        @Test(.enabled(if: Peers.hasLinuxGuest, Comment(rawValue: Peers.linuxGuestMissing)))
        func udpFromALinuxGuestUnderIntelIOMMUStrict() throws { try guestSends(iommu: true) }
    }
}

extension Interop {
    /// libvhost-pci-device's C examples as VM2 against testpmd as VM1: C
    /// programs that include only vhost_pci_device.h and link with
    /// `pkg-config --libs vhost-pci-device`.
    @Suite struct CDataPlane {
        /// testpmd txonly → vpd-counter: every frame testpmd counted as sent
        /// is counted by the C program, read in place.
        @Test(.enabled(if: Peers.hasTestpmd && CExamples.built, Comment(rawValue: Peers.testpmdMissing + "; " + CExamples.missing)))
        func aCCounterCountsEveryFrameTestpmdSends() throws {
            let b = try InteropBridge("c-count", mode: .identity)
            defer { b.stop() }
            let counter = try External(CExamples.counter, [b.peerPath], name: "c-counter")
            #expect(pollUntil(seconds: 30) { b.bridge.statistics.peer.ready }, "\(counter.output)")
            // Interactive, so forwarding stops (and the counts are printed)
            // while testpmd stays connected: what it put in the ring last
            // is still served. Leaving at once would take the ring away
            // from the counter with up to a ring of frames in it.
            let pmd = try testpmd(b.path, mode: "txonly", name: "c-tx", extra: ["-i"])
            let counted = { CExamples.numbers(counter.output, after: "vpd-counter: ")?.first ?? 0 }
            let flowed = pollUntil(seconds: 60, everyMilliseconds: 10) { counted() >= 100_000 }
            pmd.send("stop\n")
            #expect(pollUntil(seconds: 10) { testpmdCount(pmd.output, "TX-packets") != nil }, "testpmd said:\n\(pmd.output.suffix(1500))")
            let sent = testpmdCount(pmd.output, "TX-packets") ?? -1
            // The counter prints its count once a second while it changes.
            let drained = pollUntil(seconds: 10) { counted() == UInt64(max(sent, 0)) }
            #expect(drained, "testpmd sent \(sent), vpd-counter counted \(counted())")
            pmd.stop()
            let status = counter.terminate()
            let total = CExamples.numbers(counter.output, after: "vpd-counter: total ") ?? []
            #expect(flowed, "vpd-counter said:\n\(counter.output.suffix(800))\ntestpmd said:\n\(pmd.output.suffix(1500))")
            #expect(status == 0, "\(counter.output.suffix(800))")
            // frames, bytes, not Ethernet, revocations, refused
            #expect(total.count == 5 && total[0] == UInt64(max(sent, 0)) && total[2] == 0 && total[4] == 0,
                    "testpmd sent \(sent); vpd-counter: \(total)")
            #expect(b.bridge.statistics.refusals.isEmpty, "refused: \(b.bridge.statistics.refusals)")
        }

        /// testpmd io (one burst first) ↔ vpd-forwarder: the frames go round
        /// between the two; every frame testpmd sent reached the forwarder,
        /// and testpmd received what the forwarder sent back.
        @Test(.enabled(if: Peers.hasTestpmd && CExamples.built, Comment(rawValue: Peers.testpmdMissing + "; " + CExamples.missing)))
        func aCForwarderLoopsTestpmdsFramesBack() throws {
            let b = try InteropBridge("c-fwd", mode: .identity)
            defer { b.stop() }
            let forwarder = try External(CExamples.forwarder, [b.peerPath], name: "c-forwarder")
            #expect(pollUntil(seconds: 30) { b.bridge.statistics.peer.ready }, "\(forwarder.output)")
            let pmd = try testpmd(b.path, mode: "io", name: "c-io", extra: ["--tx-first"])
            let flowed = pollUntil(seconds: 60, everyMilliseconds: 10) {
                (CExamples.numbers(forwarder.output, after: "vpd-forwarder: ")?.first ?? 0) >= 50_000
            }
            pmd.stop()
            let sent = testpmdCount(pmd.output, "TX-packets") ?? -1
            let received = testpmdCount(pmd.output, "RX-packets") ?? -1
            let status = forwarder.terminate()
            // received, sent, dropped, waiting
            let total = CExamples.numbers(forwarder.output, after: "vpd-forwarder: total ") ?? []
            #expect(flowed, "vpd-forwarder said:\n\(forwarder.output.suffix(800))\ntestpmd said:\n\(pmd.output.suffix(1500))")
            #expect(status == 0, "\(forwarder.output.suffix(800))")
            #expect(total.count == 4 && total[0] == UInt64(max(sent, 0)) && total[2] == 0,
                    "testpmd sent \(sent), received \(received); vpd-forwarder: \(total)")
            // What testpmd received, the forwarder sent (frames sent after
            // testpmd stopped polling are the difference).
            #expect(total.count == 4 && received > 0 && UInt64(received) <= total[1], "testpmd received \(received); vpd-forwarder: \(total)")
            #expect(b.bridge.statistics.refusals.isEmpty, "refused: \(b.bridge.statistics.refusals)")
        }
    }
}
