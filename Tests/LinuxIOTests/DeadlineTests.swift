import Foundation
import Synchronization
import Testing
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

private func sleepMilliseconds(_ ms: UInt32) { usleep(ms * 1000) }

extension LinuxIOTests {
    /// Whole-message deadlines (issue 20, hole 1): a peer that drips bytes
    /// cannot stretch one message past its deadline, however it times them.
    @Suite struct Deadlines {
        /// A framed message whose pieces arrive in time is read whole; fds
        /// sent with the header come with it.
        @Test func aMessageInPiecesWithinItsDeadlineIsRead() throws {
            try expectNoFDLeak("pieces in time") {
                let (a, b) = try UnixSocket.pair()
                let event = try EventFD()
                let writer = try JoinableThread(name: "pieces") {
                    try? a.send([1, 0, 0, 0, 1, 0, 0, 0], fds: [event.fd.rawValue])
                    sleepMilliseconds(20)
                    try? a.send([4, 0, 0, 0, 9, 9])
                    sleepMilliseconds(20)
                    try? a.send([9, 9])
                }
                let message = try b.receiveFramed(within: 5000) { _ in 4 }
                writer.join()
                #expect(message?.payload == [9, 9, 9, 9])
                #expect(message?.fds.count == 1)
                message?.fds.forEach { try? $0.close() }
                try a.fd.close(); try b.fd.close(); try event.fd.close()
            }
        }

        /// A header, then one byte at a time: `tooSlow` at the deadline, with
        /// how far the message got; without a deadline (the old per-recv
        /// timeout) the same drip is read to the end.
        @Test func aDrippedMessageMissesItsDeadline() throws {
            let (a, b) = try UnixSocket.pair()
            defer { try? a.fd.close(); try? b.fd.close() }
            let stop = Atomic<Bool>(false)
            let writer = try JoinableThread(name: "drip") {
                _ = try? a.send([1, 0, 0, 0, 1, 0, 0, 0, 6, 0, 0, 0])
                for _ in 0..<6 where !stop.load(ordering: .acquiring) {
                    sleepMilliseconds(150)
                    _ = try? a.send([7])
                }
            }
            #expect(throws: FramingError.tooSlow(expected: 18, got: 12, milliseconds: 300)) {
                _ = try b.receiveFramed(within: 300) { _ in 6 }
            }
            stop.store(true, ordering: .releasing)
            writer.join()
            // The same socket with SO_RCVTIMEO and no deadline: every byte
            // restarts the timeout, and the drip gets through.
            let (c, d) = try UnixSocket.pair()
            defer { try? c.fd.close(); try? d.fd.close() }
            try d.setReceiveTimeout(milliseconds: 300)
            let slow = try JoinableThread(name: "drip2") {
                _ = try? c.send([1, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0])
                for _ in 0..<4 { sleepMilliseconds(150); _ = try? c.send([7]) }
            }
            let dripped = try d.receiveFramed { _ in 4 }
            slow.join()
            #expect(dripped?.payload == [7, 7, 7, 7])
        }

        /// A send into a full buffer whose reader takes a byte now and then
        /// gives up (ETIMEDOUT) at the message's deadline; SO_SNDTIMEO alone
        /// restarts with every byte read.
        @Test func aSendToAReaderThatDripsMissesItsDeadline() throws {
            let (a, b) = try UnixSocket.pair()
            defer { try? a.fd.close(); try? b.fd.close() }
            // Fill a's send buffer.
            var filled = 0
            while (try? a.send([UInt8](repeating: 0, count: 4096), nonBlocking: true)) != nil { filled += 1 }
            #expect(filled > 0)
            let stop = Atomic<Bool>(false)
            let reader = try JoinableThread(name: "sip") {
                while !stop.load(ordering: .acquiring) {
                    sleepMilliseconds(50)
                    _ = try? b.receive(maxBytes: 4096, maxFDs: 0, nonBlocking: true) // one queued message a time
                }
            }
            defer { stop.store(true, ordering: .releasing); reader.join() }
            var error: SystemCallError?
            do {
                try a.send([UInt8](repeating: 1, count: 1 << 20), deadline: .now.advanced(by: .milliseconds(300)))
            } catch let e { error = e }
            #expect(error?.errno == .timedOut, "\(String(describing: error))")
        }

        /// `Poll.wait` gives up once the deadline has passed, and returns
        /// at once when the fd is ready.
        @Test func pollWaitHonoursItsDeadline() throws {
            let (a, b) = try UnixSocket.pair()
            defer { try? a.fd.close(); try? b.fd.close() }
            #expect(throws: SystemCallError.self) {
                try Poll.wait(b.fd.rawValue, for: .readable, until: .now.advanced(by: .milliseconds(20)), operation: "recv")
            }
            try Poll.wait(a.fd.rawValue, for: .writable, until: .now.advanced(by: .seconds(5)), operation: "send")
            try a.send([1])
            try Poll.wait(b.fd.rawValue, for: .readable, until: .now.advanced(by: .seconds(5)), operation: "recv")
        }
    }

    /// `vm2-deadline-action: kill` aims at the process that connected, not
    /// at a pid number (issue 20, hole 3).
    @Suite(.serialized) struct PeerProcess {
        /// The connecting process exits before it is accepted and its pid is
        /// handed to another process (forced through ns_last_pid). The
        /// handle from `SO_PEERPIDFD` names the dead one — signalling it
        /// reaches nobody — while opening the pid SO_PEERCRED recorded, as
        /// the daemon did before, names the innocent newcomer.
        @Test func theKillHandleNamesTheProcessThatConnectedNotItsPid() throws {
            try #require(ProcessHandle.peerPidfdSupported, "this kernel has no SO_PEERPIDFD (Linux 6.5+)")
            let path = "/tmp/vpb-pidfd-\(getpid()).sock"
            let listener = try UnixSocket.listen(path: path)
            defer { try? listener.fd.close(); unlink(path) }
            let first = try ChildPeer.spawn(connectingTo: path, lifetimeSeconds: 30)
            // Connected (in the backlog), then gone and reaped.
            var queued = false
            for _ in 0..<500 where !queued {
                if let ready = try? Poll.readable([listener.fd.rawValue], timeoutMilliseconds: 10), ready[0] { queued = true }
            }
            try #require(queued)
            first.kill()
            #expect(first.wait() == .signaled(SIGKILL))
            // Hand its pid to an innocent process.
            var innocent: ChildPeer?
            for _ in 0..<200 where innocent == nil {
                guard let f = fopen("/proc/sys/kernel/ns_last_pid", "w") else { break }
                fputs("\(first.pid - 1)", f)
                fclose(f)
                let child = try ChildPeer.spawn(connectingTo: path, lifetimeSeconds: 30, reading: .nothing) // connects, then pauses
                if child.pid == first.pid { innocent = child } else { child.kill(); _ = child.wait() }
            }
            let victim = try #require(innocent, "could not recycle pid \(first.pid) (ns_last_pid not writable, or a busy machine)")
            defer { victim.kill(); _ = victim.wait() }
            let accepted = try listener.accept()
            defer { try? accepted.fd.close() }
            #expect(try accepted.peerCredentials().pid == first.pid)
            // What the daemon opens now: the process that connected.
            let handle: ProcessHandle?
            do { handle = try ProcessHandle(peerOf: accepted) } catch { handle = nil } // ESRCH: also names nobody
            if let handle {
                #expect(!handle.isAlive)
                #expect(throws: SystemCallError.self) { try handle.send(signal: SIGKILL) }
            }
            #expect(victim.ended() == nil, "the process that inherited the pid was killed")
            // What it opened before: whoever holds the number now.
            let byPid = try ProcessHandle(pid: first.pid)
            #expect(byPid.isAlive, "pid \(first.pid) names the innocent process")
        }
    }
}
