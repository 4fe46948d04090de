import Testing
import TestSupport
@testable import BridgeCore

@Suite struct AddressTests {
    @Test func addingDetectsWrapAround() {
        #expect(BusAddress(UInt64.max - 1).adding(1) == BusAddress(UInt64.max))
        #expect(BusAddress(UInt64.max - 1).adding(2) == nil)
        #expect(BusAddress(UInt64.max).adding(0) == BusAddress(UInt64.max))
    }

    @Test func offsetRefusesAddressesBelowBase() {
        #expect(GuestPhysicalAddress(10).offset(from: GuestPhysicalAddress(4)) == 6)
        #expect(GuestPhysicalAddress(3).offset(from: GuestPhysicalAddress(4)) == nil)
    }

    @Test func kindsPrintTheirNames() {
        #expect(BusAddress(0x1000).description == "bus 0x1000")
        #expect(FrontendUserAddress(0x10).description == "uaddr 0x10")
        #expect(GuestPhysicalAddress(0).description == "gpa 0x0")
    }

    @Test func permissionDecodesTheIOTLBEncoding() {
        #expect(Permission(iotlbEncoding: 0) == Permission.none)
        #expect(Permission(iotlbEncoding: 1) == .read)
        #expect(Permission(iotlbEncoding: 2) == .write)
        #expect(Permission(iotlbEncoding: 3) == .readWrite)
        #expect(Permission(iotlbEncoding: 4) == nil)
        #expect(Permission(iotlbEncoding: 255) == nil)
    }

    @Test(arguments: [
        ("64G", 64 * GiB), ("1T", TiB), ("4096", 4096), ("2M", 2 * MiB), ("2MiB", 2 * MiB),
        ("16k", 16 * KiB), ("0x1000", 4096), ("1GB", GiB),
    ])
    func parsesByteSizes(text: String, value: UInt64) {
        #expect(parseByteSize(text) == value)
    }

    @Test(arguments: ["", "G", "12Q", "-1", "99999999999999999999", "16777216T", "1.5G", "0xZZ"])
    func refusesBadByteSizes(text: String) {
        #expect(parseByteSize(text) == nil)
    }

    @Test func byteCountPrintsExactUnits() {
        #expect(ByteCount(64 * GiB).description == "64 GiB")
        #expect(ByteCount(TiB).description == "1 TiB")
        #expect(ByteCount(4097).description == "4097 B")
    }
}
