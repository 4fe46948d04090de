import Testing
import SystemPackage
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

extension LinuxIOTests {
    @Suite struct URings {
        @Test func readsAnEventFDAndReportsTheCount() throws {
            try expectNoFDLeak("uring read") {
                let ring = try URing(entries: 8)
                let e = try EventFD()
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
                defer { buffer.deallocate() }
                try ring.prepareRead(fd: e.fd.rawValue, buffer: buffer, length: 8, userData: 7)
                try ring.submit()
                #expect(ring.reap().isEmpty) // nothing signalled yet
                try e.signal(5)
                let completions = try ring.waitAndReap()
                #expect(completions == [URingCompletion(userData: 7, result: 8, flags: 0)])
                #expect(buffer.load(as: UInt64.self) == 5)
            }
        }

        @Test func linkedReadThenWriteRelaysAKick() throws {
            let ring = try URing(entries: 8)
            let kick = try EventFD(), interrupt = try EventFD()
            let counter = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
            let one = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
            defer { counter.deallocate(); one.deallocate() }
            one.storeBytes(of: UInt64(1), as: UInt64.self)
            try ring.prepareRead(fd: kick.fd.rawValue, buffer: counter, length: 8, userData: 1, linkNext: true)
            try ring.prepareWrite(fd: interrupt.fd.rawValue, buffer: one, length: 8, userData: 2)
            try ring.submit()
            try kick.signal(3)
            var seen: [URingCompletion] = []
            while seen.count < 2 { seen += try ring.waitAndReap() }
            #expect(seen.map(\.userData).sorted() == [1, 2])
            #expect(seen.allSatisfy { $0.result == 8 })
            #expect(counter.load(as: UInt64.self) == 3)
            #expect(try interrupt.read() == 1)
        }

        @Test func pollAndCancel() throws {
            let ring = try URing(entries: 8)
            let e = try EventFD()
            try ring.preparePollIn(fd: e.fd.rawValue, userData: 10)
            try ring.submit()
            try ring.prepareCancel(target: 10, userData: 11)
            var seen: [URingCompletion] = []
            while seen.count < 2 { seen += try ring.waitAndReap() }
            let poll = seen.first { $0.userData == 10 }
            #expect(poll?.errno == .canceled)
            #expect(seen.first { $0.userData == 11 }?.result == 0)
        }

        @Test func pollSeesReadability() throws {
            let ring = try URing(entries: 8)
            let e = try EventFD()
            try e.signal()
            try ring.preparePollIn(fd: e.fd.rawValue, userData: 3)
            let completions = try ring.waitAndReap()
            #expect(completions.first?.userData == 3)
            #expect((completions.first?.result ?? 0) & 1 == 1) // POLLIN
        }

        @Test func aFullSubmissionQueueIsATypedError() throws {
            let ring = try URing(entries: 4)
            for i in 0..<4 { try ring.prepareNop(userData: UInt64(i)) }
            #expect(ring.submissionSpaceLeft == 0)
            #expect(throws: URingError.submissionQueueFull) { try ring.prepareNop(userData: 99) }
            try ring.submit()
            var seen = 0
            while seen < 4 { seen += try ring.waitAndReap().count }
            try ring.prepareNop(userData: 5) // room again
        }

        @Test func readingAClosedFDCompletesWithEBADF() throws {
            let ring = try URing(entries: 4)
            let e = try EventFD()
            let raw = e.fd.rawValue
            try e.fd.close()
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
            defer { buffer.deallocate() }
            try ring.prepareRead(fd: raw, buffer: buffer, length: 8, userData: 1)
            let completions = try ring.waitAndReap()
            #expect(completions.first?.errno == .badFileDescriptor)
        }

        @Test func badSetupIsATypedError() {
            #expect(throws: URingError.self) { _ = try URing(entries: 0) }
        }

        @Test func ringIsClosedWithItsOwner() throws {
            try expectNoFDLeak("uring lifetime") {
                for _ in 0..<10 { _ = try URing(entries: 32) }
            }
        }
    }
}
