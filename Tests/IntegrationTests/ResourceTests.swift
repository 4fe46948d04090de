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

/// The fd numbers in use now.
private func openFDNumbers() -> Set<Int32> {
    guard let dir = opendir("/proc/self/fd") else { return [] }
    defer { closedir(dir) }
    var numbers: Set<Int32> = []
    let own = dirfd(dir) // closed again below: not in use afterwards
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if let n = Int32(name), n != own { numbers.insert(n) }
    }
    return numbers
}

extension Integration {
    @Suite struct Resources {
        /// Out of fds, accept fails and the listener stays readable: the
        /// bridge must pause accepting (counted) instead of spinning, and
        /// serve the front end once fds are back.
        @Test func acceptBacksOffWhenTheProcessIsOutOfFds() throws {
            let running = try RunningBridge("emfile", mode: .identity)
            defer { running.stop() }
            let soft = ResourceLimits.openFiles.soft
            defer { try? ResourceLimits.setOpenFilesSoftLimit(soft) }
            // Leave exactly one free fd number below the limit: the client's.
            let used = openFDNumbers()
            let free = (0..<Int32(4096)).filter { !used.contains($0) }.prefix(2)
            try #require(free.count == 2)
            try ResourceLimits.setOpenFilesSoftLimit(UInt64(free[free.startIndex + 1]))
            let client: UnixSocket
            do { client = try UnixSocket.connect(path: running.path) } catch {
                try ResourceLimits.setOpenFilesSoftLimit(soft)
                throw error
            }
            defer { try? client.fd.close() }
            #expect(pollUntil { running.bridge.statistics.acceptFailures >= 3 }, "accept never failed")
            // Paused 100 ms after each failure: a spinning loop would have
            // failed thousands of times by the time three were seen.
            #expect(running.bridge.statistics.acceptFailures < 50, "\(running.bridge.statistics.acceptFailures) failures")
            try ResourceLimits.setOpenFilesSoftLimit(soft)
            #expect(pollUntil { running.bridge.statistics.activeSession }, "the waiting front end is served once fds are back")
            client.shutdown()
            running.waitForSessions(1)
        }
    }
}
