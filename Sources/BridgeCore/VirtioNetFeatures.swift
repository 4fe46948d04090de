/// The virtio-net device feature bits a bridge may offer VM1 (virtio 1.x
/// §5.1.3 and §6), named as the configuration and the docs name them.
/// Transport bits the bridge manages itself (PROTOCOL_FEATURES,
/// IOMMU_PLATFORM) are not here.
public struct VirtioNetFeatures: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let mrgRxbuf = VirtioNetFeatures(rawValue: 1 << 15)
    public static let ctrlVq = VirtioNetFeatures(rawValue: 1 << 17)
    public static let mq = VirtioNetFeatures(rawValue: 1 << 22)
    public static let eventIdx = VirtioNetFeatures(rawValue: 1 << 29)
    public static let version1 = VirtioNetFeatures(rawValue: 1 << 32)

    /// Every bit with its configuration name, in bit order.
    public static let named: [(VirtioNetFeatures, String)] = [
        (.mrgRxbuf, "mrg-rxbuf"), (.ctrlVq, "ctrl-vq"), (.mq, "mq"), (.eventIdx, "event-idx"), (.version1, "version-1"),
    ]

    /// Every named bit (the device bits a bridge may offer).
    public static let allDevice: VirtioNetFeatures = [.mrgRxbuf, .ctrlVq, .mq, .eventIdx, .version1]

    /// What a bridge offers unless configured otherwise: what the device
    /// engine serves on one queue pair.
    public static let defaultOffer: VirtioNetFeatures = [.version1, .eventIdx, .mrgRxbuf]

    /// The features named in `names`; nil (with the unknown name) when one is not a feature.
    public static func parse(_ names: [String]) -> Result<VirtioNetFeatures, UnknownFeature> {
        var f: VirtioNetFeatures = []
        for name in names {
            guard let bit = named.first(where: { $0.1 == name })?.0 else { return .failure(UnknownFeature(name: name)) }
            f.insert(bit)
        }
        return .success(f)
    }

    public struct UnknownFeature: Error, Equatable, Sendable { public var name: String }

    /// The names of the bits set, in bit order; unnamed bits as `bit N`.
    public var names: [String] {
        var out = Self.named.filter { contains($0.0) }.map(\.1)
        let unnamed = rawValue & ~Self.named.reduce(0) { $0 | $1.0.rawValue }
        for bit in 0..<64 where unnamed & (1 << UInt64(bit)) != 0 { out.append("bit \(bit)") }
        return out
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: ", ") }
}
