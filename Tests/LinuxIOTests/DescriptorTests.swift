import Testing
import SystemPackage
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

extension LinuxIOTests {
    @Suite struct Descriptors {
        @Test func fdCountSeesOpenAndClose() throws {
            let before = settledOpenFileDescriptorCount()
            let e = try EventFD()
            #expect(settledOpenFileDescriptorCount() == before + 1)
            try e.fd.close()
            #expect(settledOpenFileDescriptorCount() == before)
        }

        @Test func closeIsExactlyOnce() throws {
            try expectNoFDLeak("double close") {
                let e = try EventFD()
                let raw = e.fd.rawValue
                try e.fd.close()
                #expect(!e.fd.isOpen)
                // A second close must not close whatever now has that number.
                let other = try EventFD()
                #expect(other.fd.rawValue == raw)
                try e.fd.close()
                #expect(fcntl(raw, F_GETFD) >= 0, "second close() closed somebody else's fd")
            }
        }

        @Test func deinitClosesAndReleaseHandsOver() throws {
            try expectNoFDLeak("deinit") {
                _ = try EventFD()
                _ = try Memfd(name: "t", size: 4096)
            }
            try expectNoFDLeak("release") {
                let e = try EventFD()
                let raw = e.fd.release()
                #expect(!e.fd.isOpen)
                #expect(fcntl(raw, F_GETFD) >= 0)
                close(raw)
            }
        }

        @Test func operationsOnAClosedFDFailWithEBADF() throws {
            let e = try EventFD()
            try e.fd.close()
            #expect(throws: SystemCallError.self) { try e.signal() }
            do { try e.signal() } catch { #expect(error.errno == .badFileDescriptor) }
        }

        @Test func duplicateIsIndependentlyOwned() throws {
            try expectNoFDLeak("dup") {
                let e = try EventFD()
                let d = try e.fd.duplicate()
                try e.fd.close()
                let again = EventFD(adopting: d)
                try again.signal(3)
                #expect(try again.read() == 3)
            }
        }

        @Test func memfdSizeSealsAndIO() throws {
            try expectNoFDLeak("memfd") {
                let m = try Memfd(name: "sized", size: 8 * 4096)
                #expect(try m.size == 8 * 4096)
                try m.write([1, 2, 3], at: 4095)
                #expect(try m.read(count: 3, at: 4095) == [1, 2, 3])
                try m.addSeals([.shrink])
                #expect(try m.seals.contains(.shrink))
                #expect(throws: SystemCallError.self) { try m.resize(to: 4096) }
                try m.resize(to: 16 * 4096) // growing is still allowed
                #expect(try m.size == 16 * 4096)
            }
        }

        @Test func eventfdCountsAndCoalesces() throws {
            let e = try EventFD()
            #expect(try e.read() == nil) // non-blocking, nothing pending
            for _ in 0..<1000 { try e.signal() }
            #expect(try e.read() == 1000)
            #expect(try e.read() == nil)
            #expect(try e.fd.isNonBlocking)
            let blocking = try EventFD(nonBlocking: false)
            #expect(try !blocking.fd.isNonBlocking)
            try blocking.fd.setNonBlocking(true)
            #expect(try blocking.fd.isNonBlocking)
            #expect(try blocking.read() == nil)
        }

        @Test func eventfdFullCounterReportsBackPressure() throws {
            let e = try EventFD()
            #expect(try e.signal(UInt64.max - 1))
            #expect(try e.signal(1) == false) // would overflow: EAGAIN on a non-blocking fd
            #expect(try e.read() == UInt64.max - 1)
        }
    }
}
