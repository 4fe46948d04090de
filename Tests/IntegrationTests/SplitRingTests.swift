import DeviceEngine
import BridgeCore
import EmulatedGuests
import LinuxIO
import Testing
import TestSupport

extension Integration {
    /// The typed split ring both emulated guests share: field addresses as
    /// the virtio 1.x spec lays them out, and descriptors in their 16 bytes.
    @Suite struct SplitRings {
        @Test func fieldsSitWhereTheSpecPutsThem() {
            let r = SplitRing(size: 256, desc: 0x1000, avail: 0x2000, used: 0x3000)
            #expect(r.descriptor(3) == 0x1000 + 48)
            #expect(r.availIndex == 0x2002 && r.availEntry(0) == 0x2004 && r.availEntry(257) == 0x2006, "counters wrap at the ring size")
            #expect(r.usedIndex == 0x3002 && r.usedElement(1) == 0x300c && r.usedElement(256) == 0x3004)
        }

        @Test func descriptorsRoundTripThroughSharedMemory() throws {
            let ram = try GuestRAM(size: 1 << 20)
            let d = Descriptor(address: 0x1122_3344_5566_7788, length: 1500, flags: [.next, .write], next: 7)
            #expect(d.store(to: ram.mapping, at: 0x100))
            #expect(ram.read(16, at: GuestPhysicalAddress(0x100)) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
                                                                      0xdc, 0x05, 0, 0, 3, 0, 7, 0])
            #expect(Descriptor.load(from: ram.mapping, at: 0x100) == d)
            #expect(d.hasNext && d.deviceWritable)
            #expect(Descriptor.load(from: ram.mapping, at: (1 << 20) - 8) == nil, "past the end: nil, never a fault")
            #expect(!d.store(to: ram.mapping, at: (1 << 20) - 8))
        }
    }
}
