import LinuxIO
import Foundation
import Synchronization
import Testing
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

extension LinuxIOTests {
    @Suite struct Waiting {
        @Test func waitReturnsTheValueOnceSignalledAndNilAtTheDeadline() throws {
            let event = try EventFD()
            let flag = Atomic<Int>(0)
            let t = try JoinableThread(name: "signaller") {
                flag.store(42, ordering: .releasing)
                _ = try? event.signal()
            }
            let got = event.wait(until: .now.advanced(by: .seconds(30))) { () -> Int? in
                let v = flag.load(ordering: .acquiring)
                return v == 0 ? nil : v
            }
            t.join()
            #expect(got == 42)
            #expect(event.wait(until: .now.advanced(by: .milliseconds(5))) { nil as Int? } == nil)
            #expect(event.wait(until: .now.advanced(by: .seconds(-1))) { 7 } == 7, "checked before the deadline is looked at")
        }

        /// Many callers, one server: every caller gets its own answer (no
        /// stolen wakeups), a caller whose deadline passed gets nil, and a
        /// late answer is dropped.
        @Test func mailboxAnswersEachCallerAndHonoursDeadlines() throws {
            try expectNoFDLeak("mailbox") {
                let box = try Mailbox<Int, Int>()
                let stop = Atomic<Bool>(false)
                let server = try JoinableThread(name: "server") {
                    while !stop.load(ordering: .acquiring) {
                        _ = try? Poll.readable([box.signal.fd.rawValue], timeoutMilliseconds: 10)
                        for (ticket, n) in box.take() { box.answer(ticket, n * n) }
                    }
                }
                let results = Locked<[Int: Int]>([:])
                let callers = try (1...8).map { i in
                    try JoinableThread(name: "caller-\(i)") {
                        let r = box.call(i, deadline: .now.advanced(by: .seconds(30)))
                        results.withLock { $0[i] = r }
                    }
                }
                for c in callers { c.join() }
                stop.store(true, ordering: .releasing)
                server.join()
                #expect(results.withLock { $0 } == Dictionary(uniqueKeysWithValues: (1...8).map { ($0, $0 * $0) }))
                // Nobody serves now: the deadline answers.
                #expect(box.call(5, deadline: .now.advanced(by: .milliseconds(20))) == nil)
                let late = box.take()
                #expect(late.count == 1)
                for (ticket, _) in late { box.answer(ticket, 1) } // dropped: nobody waits
            }
        }

        /// A closed mailbox answers every waiting caller, and every later one,
        /// at once: nobody waits out a deadline for a server that is gone.
        @Test func aClosedMailboxAnswersAtOnce() throws {
            let box = try Mailbox<Int, Int?>()
            let got = Locked<Int??>(nil)
            let caller = try JoinableThread(name: "caller") {
                let r = box.call(1, deadline: .now.advanced(by: .seconds(60)))
                got.withLock { $0 = r }
            }
            #expect(LinuxIOTests.waitUntil { !box.take().isEmpty || got.withLock { $0 != nil } })
            box.close(answering: nil)
            caller.join()
            #expect(got.withLock { $0 } == .some(.some(nil)))
            #expect(box.call(2, deadline: .now.advanced(by: .seconds(60))) == .some(nil), "answered at once after close")
        }

        @Test func pollTimeoutsWakeAtOrAfterTheDeadline() {
            let now = ContinuousClock.now
            #expect(Poll.timeout(until: nil, now: now) == -1)
            #expect(Poll.timeout(until: now.advanced(by: .microseconds(2300)), now: now) == 3, "rounded up")
            #expect(Poll.timeout(until: now.advanced(by: .milliseconds(-5)), now: now) == 1, "never a busy 0")
            #expect(Poll.timeout(until: now.advanced(by: .seconds(10)), now: now, atMost: 1000) == 1000)
            #expect(Poll.timeout(until: now.advanced(by: .seconds(1 << 40)), now: now) == Int32.max)
        }

        @Test func socketFileRemovesOnlySockets() throws {
            let path = temporaryPath("socketfile")
            defer { unlink(path) }
            #expect(FileManager.default.createFile(atPath: path, contents: Data("x".utf8)))
            #expect(!SocketFile.isSocket(path))
            #expect(throws: SystemCallError.self) { _ = try BoundSocketFile.record(path) }
            unlink(path)
            let s = try UnixSocket.listen(path: path)
            try s.fd.close()
            #expect(try #require(s.boundFile).remove())
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }
}

extension LinuxIOTests {
    /// Polls `condition` (a hang guard, never a timing assertion).
    static func waitUntil(_ condition: () -> Bool) -> Bool {
        for _ in 0..<20_000 {
            if condition() { return true }
            Sleep.for(.milliseconds(1))
        }
        return false
    }
}
