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
            // Other threads of the test process may close an fd meanwhile and
            // let the accept through: then try again (a few times at most).
            var provoked = false
            for attempt in 1...5 where !provoked {
                let client = try UnixSocket.unconnected() // needs no new fd once the limit is down
                defer { try? client.fd.close() }
                // No free fd number below the limit: the daemon's accept gets EMFILE.
                let used = openFDNumbers()
                let lowestFree = (0..<Int32(1 << 20)).first { !used.contains($0) } ?? 0
                try ResourceLimits.setOpenFilesSoftLimit(UInt64(lowestFree))
                try client.connect(to: running.path)
                provoked = pollUntil { running.bridge.statistics.acceptFailures >= 3 || running.bridge.statistics.activeSession }
                    && !running.bridge.statistics.activeSession
                // Paused 100 ms after each failure: a spinning loop would have
                // failed thousands of times by the time three were seen.
                if provoked {
                    #expect(running.bridge.statistics.acceptFailures < 50, "\(running.bridge.statistics.acceptFailures) failures")
                }
                try ResourceLimits.setOpenFilesSoftLimit(soft)
                #expect(pollUntil { running.bridge.statistics.activeSession }, "the waiting front end is served once fds are back")
                client.shutdown()
                running.waitForSessions(attempt)
            }
            #expect(provoked, "accept never failed for lack of fds")
        }
    }
}
