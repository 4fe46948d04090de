import BridgeCore
import DeviceEngine
import LinuxIO

/// A BAR of 1 MiB backed by a memfd, granted as the test says, with one
/// split ring at 0 and buffers from 64 KiB: the test writes what a driver
/// would (descriptors, avail entries) through the window and reads what
/// the device wrote.
struct RingFixture {
    static let barSize: UInt64 = 1 << 20
    static let buffers: UInt64 = 0x1_0000
    let memfd: Memfd
    let window: BARWindow
    var memory = DeviceMemory()
    let ring: SplitRing
    var availIndex: UInt16 = 0

    init(size: UInt32 = 8, grantAll: Bool = true) throws {
        memfd = try Memfd(name: "ring-fixture", size: Self.barSize)
        window = try BARWindow(size: Self.barSize)
        // The ring: descriptors at 0, avail at 0x1000, used at 0x2000.
        ring = SplitRing(size: size, desc: 0, avail: 0x1000, used: 0x2000)
        memory.attach(window)
        if grantAll { try grant(0, Self.barSize, .readWrite) }
    }

    mutating func grant(_ start: UInt64, _ length: UInt64, _ permission: Permission) throws {
        try memory.map(bus: start, length: length, permission: permission, fd: memfd.fd.rawValue, fdOffset: start)
    }

    /// Writes through the memfd (not the window), as VM1 would: works on
    /// ungranted ranges too.
    func poke(_ bytes: [UInt8], at offset: UInt64) { try? memfd.write(bytes, at: offset) }
    func poke16(_ v: UInt16, at offset: UInt64) { poke(withUnsafeBytes(of: v.littleEndian, Array.init), at: offset) }
    func peek(_ count: Int, at offset: UInt64) -> [UInt8] { (try? memfd.read(count: count, at: offset)) ?? [] }
    func peek16(_ offset: UInt64) -> UInt16 { let b = peek(2, at: offset); return UInt16(b[0]) | UInt16(b[1]) << 8 }
    func peek32(_ offset: UInt64) -> UInt32 { let b = peek(4, at: offset); return b.reversed().reduce(0) { $0 << 8 | UInt32($1) } }

    func setDescriptor(_ i: UInt16, address: UInt64, length: UInt32, flags: VirtqDescriptorFlags = [], next: UInt16 = 0) {
        poke(Descriptor(address: address, length: length, flags: flags, next: next).bytes, at: ring.descriptor(i))
    }

    /// Publishes chain `head` in the avail ring.
    mutating func makeAvailable(_ head: UInt16) {
        poke16(head, at: ring.availEntry(availIndex))
        availIndex &+= 1
        poke16(availIndex, at: ring.availIndex)
    }

    /// A one-buffer TX chain in descriptor `i` with `bytes` at buffers + i × 2 KiB.
    mutating func transmit(_ i: UInt16, _ bytes: [UInt8]) {
        let at = Self.buffers + UInt64(i) * 2048
        poke(bytes, at: at)
        setDescriptor(i, address: at, length: UInt32(bytes.count))
        makeAvailable(i)
    }

    /// A one-buffer RX chain of `length` bytes in descriptor `i`.
    mutating func postReceive(_ i: UInt16, length: UInt32 = 2048) {
        setDescriptor(i, address: Self.buffers + UInt64(i) * 2048, length: length, flags: .write)
        makeAvailable(i)
    }

    var usedIndex: UInt16 { peek16(ring.usedIndex) }
    func usedElement(_ n: UInt16) -> (id: UInt32, length: UInt32) {
        let at = ring.usedElement(n)
        return (peek32(at), peek32(at + 4))
    }

    /// A frame: 12-byte virtio-net header, then an IPv4 Ethernet header and `payload` bytes.
    static func frame(payload: Int, fill: UInt8 = 0xab) -> [UInt8] {
        [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xff, count: 12) + [0x08, 0x00] + [UInt8](repeating: fill, count: payload)
    }
}
