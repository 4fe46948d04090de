import BridgeCore

/// What an operator can ask a bridge to do (control socket).
public enum BridgeCommand: Sendable, Equatable, CustomStringConvertible {
    case map(bus: BusAddress, gpa: GuestPhysicalAddress, length: UInt64, permission: Permission)
    case unmap(bus: BusAddress, length: UInt64)
    case freeze

    public var description: String {
        switch self {
        case .map(let bus, let gpa, let length, let perm): "map \(bus)+\(Hex(length)) from \(gpa) \(perm)"
        case .unmap(let bus, let length): "unmap \(bus)+\(Hex(length))"
        case .freeze: "freeze"
        }
    }
}

public enum BridgeCommandError: Error, Equatable, Sendable, CustomStringConvertible {
    case noSession
    case refused(String, rule: String)
    case failed(String)
    case timedOut
    public var description: String {
        switch self {
        case .noSession: "no VM1 session is connected to this bridge"
        case .refused(let reason, _): reason
        case .failed(let reason): reason
        case .timedOut: "the bridge did not answer in time"
        }
    }
}
