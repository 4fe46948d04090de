/// The address kinds the bridge juggles. Each is its own type so that a VM1
/// user address can never be used as a BAR offset by accident (rust-vmm's
/// `GuestAddress` idea). Conversions between kinds are named functions that
/// check (see `MemoryRegionTable`), never initialisers.
public protocol AddressKind: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// Short name used in error messages ("bus", "gpa", "uaddr").
    static var kindName: String { get }
    var rawValue: UInt64 { get }
    init(_ rawValue: UInt64)
}

extension AddressKind {
    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rawValue < rhs.rawValue }

    /// `self + length`, or nil when it would wrap past `UInt64.max`.
    public func adding(_ length: UInt64) -> Self? {
        let (sum, overflow) = rawValue.addingReportingOverflow(length)
        return overflow ? nil : Self(sum)
    }

    /// Distance from `base` to `self`, or nil when `self` is below `base`.
    public func offset(from base: Self) -> UInt64? {
        rawValue >= base.rawValue ? rawValue - base.rawValue : nil
    }

    public func isAligned(to alignment: UInt64) -> Bool {
        alignment != 0 && rawValue % alignment == 0
    }

    public var description: String { "\(Self.kindName) \(Hex(rawValue))" }
}

/// A VM1 bus address: the IOVA VM1's IOMMU driver mapped, or (without a
/// vIOMMU) VM1's guest-physical address. By the project's defining rule it is
/// also the offset into the vhost-pci BAR that VM2 sees.
public struct BusAddress: AddressKind {
    public static let kindName = "bus"
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
}

/// A VM1 guest-physical address, as carried by memory-table messages.
public struct GuestPhysicalAddress: AddressKind {
    public static let kindName = "gpa"
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
}

/// An address in the address space of VM1's VMM process (QEMU, DPDK): the
/// `userspace_addr` of memory regions, IOTLB `uaddr`, and vring addresses
/// when VIRTIO_F_IOMMU_PLATFORM is not negotiated.
public struct FrontendUserAddress: AddressKind {
    public static let kindName = "uaddr"
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
}

/// Formats a number as `0x…` for log lines and errors.
public struct Hex: CustomStringConvertible, Sendable, Equatable {
    public let value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public var description: String { "0x" + String(value, radix: 16) }
}

/// Formats a byte count the way people read it (4 KiB, 64 GiB, 1 TiB + 4 KiB
/// would print as the exact hex instead).
public struct ByteCount: CustomStringConvertible, Sendable, Equatable {
    public let value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public var description: String {
        let units: [(UInt64, String)] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        for (size, name) in units where value >= size && value % size == 0 {
            return "\(value / size) \(name)"
        }
        return "\(value) B"
    }
}

/// Parses sizes such as `64G`, `1T`, `2MiB`, `4096`, `0x1000` (binary units).
public func parseByteSize(_ text: String) -> UInt64? {
    var body = Substring(text.uppercased()).drop { $0 == " " }
    while body.last == " " { body = body.dropLast() }
    if body.hasPrefix("0X") { return UInt64(body.dropFirst(2), radix: 16) }
    if body.count > 1, body.hasSuffix("B") { body = body.dropLast() }
    if body.hasSuffix("I") { body = body.dropLast() }
    var shift: UInt64 = 0
    if let last = body.last, let index = "KMGTP".firstIndex(of: last) {
        shift = 10 * UInt64("KMGTP".distance(from: "KMGTP".startIndex, to: index) + 1)
        body = body.dropLast()
    }
    guard let number = UInt64(body) else { return nil }
    let (value, overflow) = number.multipliedReportingOverflow(by: 1 << shift)
    return overflow ? nil : value
}

/// Access rights of a mapping: what VM2 may do with the bytes.
public struct Permission: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = Permission(rawValue: 1)
    public static let write = Permission(rawValue: 2)
    public static let readWrite: Permission = [.read, .write]
    public static let none: Permission = []

    /// vhost-user IOTLB encoding: 0 none, 1 RO, 2 WO, 3 RW; anything else is nil.
    public init?(iotlbEncoding value: UInt8) {
        guard value <= 3 else { return nil }
        self.init(rawValue: value)
    }

    public var description: String {
        switch self {
        case .readWrite: "rw"
        case .read: "r"
        case .write: "w"
        default: "none"
        }
    }
}
