import BridgeCore
import VhostUser
import BridgeDaemon
import Foundation
import LinuxIO
import Logging
import Testing
import TestSupport

/// Threads of this process named `name` (/proc/self/task/*/comm).
func threadsNamed(_ name: String) -> Int {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    return tasks.filter { task in
        (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) == name
    }.count
}

/// A bridge that cannot start gives back everything it took, including the
/// notification relay it had started (its thread holds the relay, so
/// dropping the relay alone never stopped it: each failed `create` left a
/// thread, an io_uring ring and its eventfds behind).
@Suite(.serialized) struct BridgeStartTests {
    static let logger = Logger(label: "test")

    func settings(socket: String, peer: String?) -> BridgeSettings {
        BridgeSettings(name: "fails", socketPath: socket, peerSocketPath: peer,
                       backend: BackendConfiguration(bridgeName: "fails", addressSpace: AddressSpaceConfiguration(barSize: 1 << 30, mode: .iommu)))
    }

    @Test(arguments: ["vhost-user", "peer"])
    func aBridgeThatCannotListenLeavesNoThreadOrFd(failing socket: String) throws {
        let dir = "/tmp/vpb-test-\(getpid())-start"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let missing = "\(dir)/no-such-directory/x.sock"
        let s = socket == "vhost-user" ? settings(socket: missing, peer: "\(dir)/vm2.sock")
                                       : settings(socket: "\(dir)/vm1.sock", peer: missing)
        let relaysBefore = threadsNamed("relay")
        let fdsBefore = settledOpenFileDescriptorCount()
        for _ in 0..<5 {
            #expect(throws: BridgeError.self) { _ = try Bridge(s, logger: Self.logger) }
        }
        #expect(pollUntil { threadsNamed("relay") == relaysBefore }, "relay threads: \(threadsNamed("relay")), \(relaysBefore) before")
        #expect(pollUntil { openFileDescriptorCount() == fdsBefore }, "fds: \(openFileDescriptorCount()), \(fdsBefore) before")
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/vm1.sock") && !FileManager.default.fileExists(atPath: "\(dir)/vm2.sock"),
                "no socket file is left either")
    }

    /// A bridge that was made but never served (its thread could not be
    /// started) gives its relay and socket files back when it is released.
    @Test func aBridgeNeverServedGivesEverythingBackWhenReleased() throws {
        let dir = "/tmp/vpb-test-\(getpid())-unserved"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let relaysBefore = threadsNamed("relay")
        let fdsBefore = settledOpenFileDescriptorCount()
        do {
            let bridge = try Bridge(settings(socket: "\(dir)/vm1.sock", peer: "\(dir)/vm2.sock"), logger: Self.logger)
            #expect(threadsNamed("relay") == relaysBefore + 1)
            bridge.stop()
        }
        #expect(pollUntil { threadsNamed("relay") == relaysBefore }, "relay threads: \(threadsNamed("relay")), \(relaysBefore) before")
        #expect(pollUntil { openFileDescriptorCount() == fdsBefore }, "fds: \(openFileDescriptorCount()), \(fdsBefore) before")
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/vm1.sock") && !FileManager.default.fileExists(atPath: "\(dir)/vm2.sock"),
                "its socket files are removed")
    }

    /// Issue 20, hole 8: a socket directory others can write (not sticky
    /// and root's) stops the bridge from starting, naming the path and why;
    /// nothing is bound there.
    @Test func aBridgeDoesNotStartInADirectoryOthersCanWrite() throws {
        let dir = "/tmp/vpb-test-\(getpid())-writable"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(chmod(dir, 0o777) == 0)
        do {
            _ = try Bridge(settings(socket: "\(dir)/vm1.sock", peer: nil), logger: Self.logger)
            Issue.record("the bridge started")
        } catch {
            #expect("\(error)".contains("vhost-user socket: bind(\(dir)/vm1.sock): refused: socket directory \(dir) is writable by its group and others"), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/vm1.sock"))
    }

    /// Issue 20, hole 9: a bridge removes the socket files it bound, and
    /// leaves alone a socket someone else bound at one of its paths since.
    @Test func aBridgeRemovesOnlyTheSocketFilesItBound() throws {
        let dir = "/tmp/vpb-test-\(getpid())-rebound"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let someoneElse: UnixSocket
        do {
            let bridge = try Bridge(settings(socket: "\(dir)/vm1.sock", peer: "\(dir)/vm2.sock"), logger: Self.logger)
            #expect(unlink("\(dir)/vm1.sock") == 0)
            someoneElse = try UnixSocket.listen(path: "\(dir)/vm1.sock")
            bridge.stop()
        }
        #expect(FileManager.default.fileExists(atPath: "\(dir)/vm1.sock"), "the other socket is still there")
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/vm2.sock"), "its own is removed")
        try UnixSocket.connect(path: "\(dir)/vm1.sock").fd.close()
        try someoneElse.fd.close()
    }
}
