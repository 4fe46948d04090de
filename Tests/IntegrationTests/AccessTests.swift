import BridgeCore
import DeviceEngine
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import PeerProtocol
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// An iommu bridge with `vm2-deadline-action: kill`, VM2's VMM a forked
/// child that greets and then behaves as `reading` says, and an emulated VM1
/// that grants one page (read-write) and revokes it (`revoke`: an
/// invalidate unless said otherwise): `after` runs once VM1's message was
/// acknowledged, with the VMM and the revoked IOVA. The VMM never
/// outlives the call.
func revokeFromAChildVMM(_ name: String, revocationDeadline: Int, reading: ChildPeer.Reading, lifetimeSeconds: UInt32 = 20,
                         features: PeerFeatures = [],
                         revoke: (EmulatedIOMMU, BusAddress) throws -> Void = { try $0.unmap($1) },
                         _ after: (RunningBridge, ChildPeer, BusAddress) throws -> Void) throws {
    let running = try RunningBridge(name, mode: .iommu, revocationDeadline: revocationDeadline) { $0.vm2DeadlineAction = .kill }
    defer { running.stop() }
    let hello = PeerCodec.encode(.hello(PeerHello(features: features, deviceFeatures: NetDevice.served)))
    let vmm = try ChildPeer.spawn(connectingTo: running.peerPath, hello: hello, lifetimeSeconds: lifetimeSeconds, reading: reading)
    defer { if vmm.ended() == nil { vmm.kill(); _ = vmm.wait() } }
    #expect(pollUntil { running.bridge.statistics.peer.ready })
    let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
    defer { vm1.disconnect() }
    try vm1.start()
    let iommu = try #require(vm1.iommu)
    let iova = try iommu.map(GuestPhysicalAddress(0x90_0000), length: 4096, permission: .readWrite, eager: true)
    try revoke(iommu, iova) // returns with VM1's ack
    try after(running, vmm, iova)
}

extension Integration {
    @Suite struct Access {
        private let nobody: UInt32 = 65534

        /// Socket files get the configured mode and group; the allow-lists
        /// are checked on SO_PEERCRED, supplementary groups included.
        @Test func bothSocketsEnforceModeAndAllowLists() throws {
            let access = PeerAccess(group: 4242, mode: 0o666, allowedGroups: [4242])
            let running = try RunningBridge("access", mode: .identity) { s in
                s.vm1Access = access
                s.vm2Access = access
            }
            defer { running.stop() }
            for path in [running.path, running.peerPath] {
                var st = stat()
                #expect(stat(path, &st) == 0)
                #expect(st.st_mode & 0o777 == 0o666 && st.st_gid == 4242, "\(path): mode \(String(st.st_mode & 0o777, radix: 8)) gid \(st.st_gid)")
            }
            // Not in the group: refused and closed, on either socket.
            for path in [running.path, running.peerPath] {
                let outsider = try ChildPeer.spawn(connectingTo: path, uid: nobody, gid: nobody)
                #expect(outsider.wait() == .exited(0), "the daemon closes the connection")
            }
            #expect(running.bridge.statistics.accessDenied == 2)
            #expect(running.bridge.statistics.sessionsServed == 0 && !running.bridge.statistics.peer.connected)
            // A supplementary group member gets in (the daemon keeps the connection).
            let member = try ChildPeer.spawn(connectingTo: running.path, uid: nobody, gid: nobody, groups: [4242])
            #expect(pollUntil { running.bridge.statistics.activeSession })
            member.kill()
            #expect(member.wait() == .signaled(SIGKILL))
            running.waitForSessions(1)
            #expect(running.bridge.statistics.accessDenied == 2)
        }

        /// `vm2-deadline-action: kill`: a VM2 VMM that never acknowledges a
        /// revocation is disconnected *and* killed through its pidfd.
        @Test func aVM2ThatIgnoresRevocationIsKilled() throws {
            // Acked once VM2 is disconnected (and killed).
            try revokeFromAChildVMM("kill", revocationDeadline: 50, reading: .everything) { running, vmm, iova in
                #expect(vmm.wait() == .signaled(SIGKILL))
                let s = running.bridge.statistics
                #expect(s.peer.revocationTimeouts >= 1 && s.peer.killed >= 1)
                #expect(running.bridge.window.probeInChild(iova) == .faulted)
            }
        }

        /// A VM2 VMM that stops reading its socket is killed (with the
        /// `kill` action) once a send to it times out, and the daemon waits
        /// until it is gone: it is not left alive, holding every mapping it
        /// was granted, while VM1's later invalidates are acked without it.
        /// (Before, a failed send only disconnected it.)
        @Test func aVM2ThatStopsReadingIsKilled() throws {
            let running = try RunningBridge("stops-reading", mode: .iommu, revocationDeadline: 1000) { $0.vm2DeadlineAction = .kill }
            defer { running.stop() }
            let hello = PeerCodec.encode(.hello(PeerHello(features: [], deviceFeatures: NetDevice.served)))
            let vmm = try ChildPeer.spawn(connectingTo: running.peerPath, hello: hello, reading: .nothing)
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            let iommu = try #require(vm1.iommu)
            // Grants until their MAPs no longer fit in the VMM's socket.
            var granted = 0
            while granted < 20_000, running.bridge.statistics.peer.ready {
                _ = try iommu.map(GuestPhysicalAddress(0x80_0000 + UInt64(granted % 64) * 4096), length: 4096, permission: .readWrite, eager: true)
                granted += 1
            }
            let killed = pollUntil(seconds: 30) { running.bridge.statistics.peer.killed == 1 }
            if !killed { vmm.kill() } // never leave it behind
            #expect(killed, "the daemon did not kill the VMM after \(granted) grants")
            #expect(vmm.wait() == .signaled(SIGKILL))
            #expect(running.bridge.statistics.peer.revocationTimeouts == 0, "killed for not reading, not for a missed deadline")
        }

        /// A read-only grant travels with a read-only fd: even a VM2 VMM that
        /// ignores `prot` cannot map it writable.
        @Test func readOnlyGrantsCarryReadOnlyFds() throws {
            let running = try RunningBridge("ro-fd", mode: .iommu)
            defer { running.stop() }
            let raw = try RawVM2(running.peerPath)
            #expect(try raw.greet() != nil)
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            let iommu = try #require(vm1.iommu)
            let ro = try iommu.map(GuestPhysicalAddress(0xa0_0000), length: 4096, permission: .read, eager: true)
            let rw = try iommu.map(GuestPhysicalAddress(0xb0_0000), length: 4096, permission: .readWrite, eager: true)
            var seen: [UInt64: Bool] = [:] // barOffset → fd read-only
            while seen[ro.rawValue] == nil || seen[rw.rawValue] == nil, let (message, fds) = try raw.receiveWithFDs() {
                if case .map(let m) = message, let fd = fds.first {
                    seen[m.barOffset] = fd.isReadOnly
                    if m.barOffset == ro.rawValue {
                        let p = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, off_t(m.fdOffset))
                        #expect(p == MAP_FAILED && errno == EACCES, "a read-only grant mapped writable")
                        if p != MAP_FAILED { munmap(p, 4096) }
                    }
                    try raw.send(.ack(m.sequence))
                }
                for fd in fds { try? fd.close() }
            }
            #expect(seen[ro.rawValue] == true && seen[rw.rawValue] == false, "\(seen)")
        }
    }
}
