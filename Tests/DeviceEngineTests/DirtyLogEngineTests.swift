import BridgeCore
@testable import DeviceEngine
import LinuxIO
import Testing

/// The engine's dirty logging: every write into VM1's memory — packet
/// data, the used ring, the used index — is marked by guest-physical page,
/// through each grant's own guest-physical address; nothing is marked when
/// logging is off.
@Suite struct DirtyLogEngineTests {
    /// A sealed log for `pages` pages, and its reading side.
    static func makeLog(pages: UInt64) throws -> (Memfd, DirtyLogMemory) {
        let bytes = (pages + 7) / 8
        let memfd = try Memfd(name: "log", size: bytes)
        try memfd.addSeals([.shrink, .grow])
        return (memfd, try DirtyLogMemory(adopting: memfd.fd, size: bytes, offset: 0))
    }

    static func marked(_ log: DirtyLogMemory) -> Set<UInt64> { Set((0..<log.size * 8).filter { log.isMarked(page: $0) }) }

    func receive(_ f: inout RingFixture, _ q: inout DeviceQueue, _ frames: [[UInt8]]) {
        var counters = QueueCounters(), scratch = Segments()
        _ = f.memory.burst { a in
            for frame in frames {
                _ = frame.withUnsafeBytes { q.deliver(&a, frame: $0, mergeable: true, scratch: &scratch, counters: &counters) }
            }
            _ = q.publish(&a)
        }
    }

    @Test func receivedFramesAndTheUsedRingAreMarkedAtTheirGuestPhysicalPages() throws {
        // The BAR is an IOVA space: bus 0 is guest-physical 0x4000_0000 (page 0x40000).
        var f = try RingFixture(grantAll: false)
        let gpa: UInt64 = 0x4000_0000
        try f.memory.map(bus: 0, length: RingFixture.barSize, permission: .readWrite, fd: f.memfd.fd.rawValue, fdOffset: 0, guestPhysical: gpa)
        let (memfd, log) = try Self.makeLog(pages: 0x40000 + 256)
        defer { try? memfd.fd.close() }
        f.memory.setDirtyLog(log)
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.postReceive(0)
        f.postReceive(5, length: 100)
        f.postReceive(6, length: 2048)
        // One frame in buffer 0 (page 0x10 of the BAR), one across buffers 5 and 6 (mergeable).
        receive(&f, &q, [RingFixture.frame(payload: 100), RingFixture.frame(payload: 150)])
        let page = { (bus: UInt64) in (gpa + bus) >> 12 }
        let expected: Set<UInt64> = [page(0x2000),                            // the used ring
                                     page(RingFixture.buffers),               // buffer 0
                                     page(RingFixture.buffers + 5 * 2048),    // buffer 5
                                     page(RingFixture.buffers + 6 * 2048)]
        #expect(Self.marked(log) == expected)
        #expect(f.memory.unloggedWrites == 0 && f.memory.loggedWrites > 0)
    }

    @Test func aWriteAcrossGrantsWithDifferentGuestPhysicalAddressesIsMarkedPieceByPiece() throws {
        var f = try RingFixture(grantAll: false)
        try f.memory.map(bus: 0, length: RingFixture.buffers, permission: .readWrite, fd: f.memfd.fd.rawValue, fdOffset: 0, guestPhysical: 0x10_0000)
        // The buffers: two pages each mapped somewhere else in VM1.
        try f.memory.map(bus: RingFixture.buffers, length: 0x1000, permission: .readWrite, fd: f.memfd.fd.rawValue,
                         fdOffset: RingFixture.buffers, guestPhysical: 0x80_0000)
        try f.memory.map(bus: RingFixture.buffers + 0x1000, length: 0x1000, permission: .readWrite, fd: f.memfd.fd.rawValue,
                         fdOffset: RingFixture.buffers + 0x1000, guestPhysical: 0x20_0000)
        let (memfd, log) = try Self.makeLog(pages: 0x1000)
        defer { try? memfd.fd.close() }
        f.memory.setDirtyLog(log)
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.setDescriptor(0, address: RingFixture.buffers + 0xf00, length: 0x200, flags: .write)
        f.makeAvailable(0)
        receive(&f, &q, [RingFixture.frame(payload: 400)])
        #expect(Self.marked(log) == [0x102, 0x800, 0x200], "used ring at 0x102000, the buffer's two halves at 0x800f00 and 0x200000")
    }

    @Test func loggingOffMarksNothingAndUnknownAddressesAreCounted() throws {
        var f = try RingFixture() // granted without guest-physical addresses
        let (memfd, log) = try Self.makeLog(pages: 512)
        defer { try? memfd.fd.close() }
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.postReceive(0)
        receive(&f, &q, [RingFixture.frame(payload: 64)])
        #expect(Self.marked(log).isEmpty && f.memory.loggedWrites == 0 && f.memory.unloggedWrites == 0)
        // On, but the daemon never said where the grant is in VM1: counted, never guessed.
        f.memory.setDirtyLog(log)
        f.postReceive(1)
        receive(&f, &q, [RingFixture.frame(payload: 64)])
        #expect(Self.marked(log).isEmpty)
        #expect(f.memory.unloggedWrites > 0)
    }

    @Test func pagesPastTheLogAreNotWrittenAndAreCounted() throws {
        var f = try RingFixture(grantAll: false)
        try f.memory.map(bus: 0, length: RingFixture.barSize, permission: .readWrite, fd: f.memfd.fd.rawValue, fdOffset: 0, guestPhysical: 0)
        let (memfd, log) = try Self.makeLog(pages: 8) // covers 32 KiB: the ring, not the buffers at 64 KiB
        defer { try? memfd.fd.close() }
        f.memory.setDirtyLog(log)
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.postReceive(0)
        receive(&f, &q, [RingFixture.frame(payload: 64)])
        #expect(Self.marked(log) == [2])
        #expect(f.memory.unloggedWrites > 0)
    }

    @Test func transmitCompletionsMarkTheUsedRing() throws {
        var f = try RingFixture(grantAll: false)
        try f.memory.map(bus: 0, length: RingFixture.barSize, permission: .readWrite, fd: f.memfd.fd.rawValue, fdOffset: 0, guestPhysical: 0)
        let (memfd, log) = try Self.makeLog(pages: 512)
        defer { try? memfd.fd.close() }
        f.memory.setDirtyLog(log)
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        f.transmit(0, RingFixture.frame(payload: 64))
        var counters = QueueCounters(), scratch = Segments(), call = false
        _ = f.memory.burst { a in q.transmitBurst(&a, budget: 8, scratch: &scratch, counters: &counters, call: &call) { _, _ in } }
        #expect(Self.marked(log) == [2], "VM2 only read the frame: only the used ring changed")
    }

    @Test func aLogFileTheDeviceCannotTrustIsRefused() throws {
        let unsealed = try Memfd(name: "log", size: 4096)
        defer { try? unsealed.fd.close() }
        #expect(throws: SystemCallError.self) { try DirtyLogMemory(adopting: unsealed.fd, size: 4096, offset: 0) }
        let small = try Memfd(name: "log", size: 4096)
        defer { try? small.fd.close() }
        try small.addSeals([.shrink])
        #expect(throws: SystemCallError.self) { try DirtyLogMemory(adopting: small.fd, size: 4096, offset: 4096) }
        #expect(throws: SystemCallError.self) { try DirtyLogMemory(adopting: small.fd, size: UInt64.max, offset: 2) }
        // A sealed file cannot be truncated under the writer afterwards.
        #expect(throws: SystemCallError.self) { try small.resize(to: 0) }
    }
}
