import BridgeCore
import LinuxIO

/// An emulated guest's RAM: a sparse memfd (like QEMU's
/// memory-backend-memfd) mapped into this process. Guest-physical address 0
/// is the first byte; the mapping's address plays the VMM's `userspace_addr`.
public struct GuestRAM: Sendable {
    public let memfd: Memfd
    public let mapping: MemoryMapping
    public let size: UInt64

    public init(size: UInt64, name: String = "vm1-ram", sealed: Bool = true, hugePages: Bool = false) throws(SystemCallError) {
        memfd = try Memfd(name: name, size: size, hugePages: hugePages)
        // Like QEMU's memory-backend-memfd (seal=on): the size is fixed, so no
        // peer mapping it can be hit by SIGBUS from a truncate. (seal=off, or
        // hugetlbfs, is what front ends send too: `sealed: false`.)
        if sealed { try memfd.addSeals([.shrink, .grow]) }
        mapping = try MemoryMapping(fd: memfd.fd, size: size)
        self.size = size
    }

    /// The front end's user address of guest-physical `gpa`.
    public func userAddress(of gpa: GuestPhysicalAddress) -> FrontendUserAddress {
        FrontendUserAddress(mapping.address + gpa.rawValue)
    }

    /// The region descriptor a memory-table message carries for this RAM.
    public var region: RegionDescriptor {
        RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: size,
                         userAddress: FrontendUserAddress(mapping.address), mmapOffset: 0)
    }

    public func write(_ bytes: [UInt8], at gpa: GuestPhysicalAddress) -> Bool { mapping.write(bytes, at: gpa.rawValue) }
    public func read(_ count: Int, at gpa: GuestPhysicalAddress) -> [UInt8]? { mapping.read(count, at: gpa.rawValue) }
}
