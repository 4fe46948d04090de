import BridgeCore
import VhostUser

/// First-fit IOVA allocator over a window, in whole pages (like an IOMMU
/// driver's IOVA domain honouring a DMA window).
public struct IOVAAllocator: Sendable {
    public enum Failure: Error, Equatable { case exhausted(requested: UInt64, window: BusWindow) }
    public let window: BusWindow
    public let pageSize: UInt64
    /// Free ranges [start, end), sorted, non-adjacent.
    private var free: [(UInt64, UInt64)]

    public init(window: BusWindow, pageSize: UInt64 = 4096) {
        self.window = window
        self.pageSize = pageSize
        free = [(window.base.rawValue, window.limit)]
    }

    public mutating func allocate(_ length: UInt64) throws(Failure) -> BusAddress {
        let size = (length + pageSize - 1) / pageSize * pageSize
        guard size > 0, let i = free.firstIndex(where: { $0.1 - $0.0 >= size }) else {
            throw .exhausted(requested: length, window: window)
        }
        let start = free[i].0
        if free[i].1 - start == size { free.remove(at: i) } else { free[i].0 = start + size }
        return BusAddress(start)
    }

    public mutating func release(_ address: BusAddress, length: UInt64) {
        let size = (length + pageSize - 1) / pageSize * pageSize
        var start = address.rawValue, end = start + size
        var i = free.firstIndex { $0.0 > start } ?? free.endIndex
        if i > 0, free[i - 1].1 == start { start = free[i - 1].0; free.remove(at: i - 1); i -= 1 }
        if i < free.count, free[i].0 == end { end = free[i].1; free.remove(at: i) }
        free.insert((start, end), at: i)
    }
}

/// VM1's vIOMMU as the vhost-user back end sees it through QEMU: the guest's
/// IOMMU driver maps buffers (IOVA → GPA), the VMM sends IOTLB updates for
/// them (eagerly, or only when the back end raises a miss) and an invalidate
/// when they are unmapped.
public final class EmulatedIOMMU {
    public struct Entry: Equatable, Sendable {
        public var iova: BusAddress
        public var gpa: GuestPhysicalAddress
        public var length: UInt64
        public var permission: Permission
    }

    public private(set) var allocator: IOVAAllocator
    public private(set) var entries: [UInt64: Entry] = [:]
    let ram: GuestRAM
    let frontend: VhostUserFrontend
    public var updatesSent = 0
    public var invalidatesSent = 0
    public var missesAnswered = 0
    public var missesIgnored = 0

    public init(ram: GuestRAM, frontend: VhostUserFrontend, window: BusWindow) {
        self.ram = ram
        self.frontend = frontend
        self.allocator = IOVAAllocator(window: window)
    }

    /// Maps `[gpa, gpa+length)` at a fresh IOVA; with `eager` the VMM sends
    /// the IOTLB update right away (acked), otherwise only on a miss.
    public func map(_ gpa: GuestPhysicalAddress, length: UInt64, permission: Permission, eager: Bool) throws -> BusAddress {
        let iova = try allocator.allocate(length)
        let size = (length + allocator.pageSize - 1) / allocator.pageSize * allocator.pageSize
        let entry = Entry(iova: iova, gpa: gpa, length: size, permission: permission)
        entries[iova.rawValue] = entry
        if eager { try sendUpdate(entry) }
        return iova
    }

    /// Unmaps and sends the invalidate (acked: when it returns the back end
    /// has revoked the range).
    public func unmap(_ iova: BusAddress) throws {
        guard let entry = entries.removeValue(forKey: iova.rawValue) else { return }
        try frontend.send(.iotlb(IOTLBMessage(iova: iova.rawValue, size: entry.length, userAddress: 0,
                                              permission: .none, type: .invalidate)), ack: true)
        invalidatesSent += 1
        allocator.release(iova, length: entry.length)
    }

    /// Changes a mapping's permission in place and sends the update (acked):
    /// lowering it is a revocation, as in QEMU's `iommu_notify` of a
    /// narrower entry.
    public func update(_ iova: BusAddress, permission: Permission) throws {
        guard var entry = entries[iova.rawValue] else { return }
        entry.permission = permission
        entries[iova.rawValue] = entry
        try sendUpdate(entry)
    }

    func sendUpdate(_ entry: Entry) throws {
        try frontend.send(.iotlb(IOTLBMessage(iova: entry.iova.rawValue, size: entry.length,
                                              userAddress: ram.userAddress(of: entry.gpa).rawValue,
                                              permission: entry.permission, type: .update)), ack: true)
        updatesSent += 1
    }

    /// Answers a back-end miss like QEMU: an update for the entry that holds
    /// the IOVA, or nothing when no entry does (an invalid IOVA).
    public func answer(_ miss: IOTLBMessage) throws {
        guard let entry = entries.values.first(where: { miss.iova >= $0.iova.rawValue && miss.iova - $0.iova.rawValue < $0.length }) else {
            missesIgnored += 1
            return
        }
        try sendUpdate(entry)
        missesAnswered += 1
    }
}
