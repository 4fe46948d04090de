import Foundation
import Testing
import SystemPackage
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

extension LinuxIOTests {
    @Suite struct Sockets {
        @Test(arguments: [0, 1, 8])
        func scmRightsRoundTrip(count: Int) throws {
            try expectNoFDLeak("SCM_RIGHTS with \(count) fds") {
                let (a, b) = try UnixSocket.pair(.seqpacket)
                let memfds = try (0..<count).map { i in try Memfd(name: "m\(i)", size: 4096) }
                for (i, m) in memfds.enumerated() { try m.write([UInt8(i + 1)], at: 0) }
                try a.send([0xAB, 0xCD], fds: memfds.map(\.fd.rawValue))
                let message = try b.receive(maxBytes: 64)
                #expect(message.bytes == [0xAB, 0xCD])
                #expect(message.fds.count == count)
                #expect(!message.truncated)
                for (i, fd) in message.fds.enumerated() {
                    // A new number for the same file: bytes written before are visible.
                    #expect(fd.rawValue != memfds[i].fd.rawValue)
                    #expect(try Memfd(adopting: fd).read(count: 1, at: 0) == [UInt8(i + 1)])
                    #expect(fcntl(fd.rawValue, F_GETFD) & FD_CLOEXEC != 0, "received fds must be CLOEXEC")
                }
            }
        }

        @Test func surplusFDsAreClosedNotLeaked() throws {
            try expectNoFDLeak("surplus fds") {
                let (a, b) = try UnixSocket.pair(.stream)
                let events = try (0..<8).map { _ in try EventFD() }
                try a.send([1, 2, 3, 4], fds: events.map(\.fd.rawValue))
                let countWithMessageInFlight = openFileDescriptorCount()
                let message = try b.receive(maxBytes: 16, maxFDs: 2)
                #expect(message.fds.count == 2)
                #expect(message.truncated)
                // Only the two kept fds were added to the process.
                #expect(openFileDescriptorCount() == countWithMessageInFlight + 2)
                message.closeAllFDs()
                #expect(openFileDescriptorCount() == countWithMessageInFlight)
            }
        }

        @Test func fdsOnAMessageThatTakesNoneAreClosed() throws {
            try expectNoFDLeak("unexpected fds") {
                let (a, b) = try UnixSocket.pair(.stream)
                let e = try EventFD()
                try a.send([9, 9, 9, 9], fds: [e.fd.rawValue])
                let bytes = try b.receiveExactly(4) // maxFDs 0: any fd is closed at once
                #expect(bytes == [9, 9, 9, 9])
            }
        }

        @Test func listenConnectAcceptAndPeerCredentials() throws {
            let path = temporaryPath("listen.sock")
            defer { unlink(path) }
            try expectNoFDLeak("listen/connect/accept") {
                let server = try UnixSocket.listen(path: path)
                let client = try UnixSocket.connect(path: path)
                let conn = try server.accept()
                let creds = try conn.peerCredentials()
                #expect(creds.pid == getpid())
                #expect(creds.uid == getuid())
                #expect(creds.gid == getgid())
                try client.send(Array(repeating: 7, count: 100_000))
                var total = 0
                while total < 100_000 { total += try conn.receive(maxBytes: 65536).bytes.count }
                #expect(total == 100_000)
                try client.fd.close()
                #expect(try conn.receive(maxBytes: 16).bytes.isEmpty) // EOF
            }
        }

        @Test func staleSocketFileIsReplacedLiveOneIsNot() throws {
            let path = temporaryPath("stale.sock")
            defer { unlink(path) }
            do {
                let first = try UnixSocket.listen(path: path)
                #expect(throws: SystemCallError.self) { _ = try UnixSocket.listen(path: path) }
                try first.fd.close()
            }
            // The file is still there but nobody listens: a restart must work.
            let second = try UnixSocket.listen(path: path)
            #expect(second.fd.isOpen)
        }

        @Test func tooLongPathIsATypedError() {
            let path = "/tmp/" + String(repeating: "x", count: 200)
            #expect(throws: SystemCallError("bind(\(path))", errno: .fileNameTooLong)) { _ = try UnixSocket.listen(path: path) }
        }

        @Test func connectToNothingNamesTheOperation() {
            do {
                _ = try UnixSocket.connect(path: temporaryPath("nobody.sock"))
                Issue.record("connect succeeded")
            } catch {
                #expect(error.errno == .noSuchFileOrDirectory)
                #expect(error.description.contains("connect("))
            }
        }
    }
}

extension LinuxIOTests {
    @Suite struct StaleSockets {
        /// Only a socket nobody listens on is replaced; a regular file at the
        /// path is never unlinked (bind fails instead).
        @Test func onlyASocketIsEverCalledStale() throws {
            let path = temporaryPath("stale-file")
            defer { unlink(path) }
            #expect(FileManager.default.createFile(atPath: path, contents: Data("x".utf8)))
            #expect(throws: SystemCallError.self) { _ = try UnixSocket.listen(path: path) }
            #expect(FileManager.default.fileExists(atPath: path))
            unlink(path)
            do { let first = try UnixSocket.listen(path: path); try first.fd.close() } // leaves a dead socket file
            let second = try UnixSocket.listen(path: path)
            try second.fd.close()
        }
    }
}
