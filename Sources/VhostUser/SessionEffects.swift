import BridgeCore

/// One fd that came with the message being handled: its position in the
/// message, what the kernel says it is, and for memory fds the file's size
/// (fstat) so regions can be checked against it.
public struct ReceivedFile: Equatable, Sendable {
    public var index: Int
    public var size: UInt64?
    public var kind: FileKind
    /// Huge page size of hugetlbfs memory (fstatfs), 0 for ordinary pages.
    public var hugePageSize: UInt64
    /// The file carries F_SEAL_SHRINK (a memfd nobody can truncate).
    public var sealedAgainstShrinking: Bool
    public init(index: Int, size: UInt64?, kind: FileKind, hugePageSize: UInt64 = 0, sealedAgainstShrinking: Bool = false) {
        self.index = index; self.size = size; self.kind = kind; self.hugePageSize = hugePageSize
        self.sealedAgainstShrinking = sealedAgainstShrinking
    }
}

public enum VringFileKind: String, Sendable, Equatable { case kick, call, err }

/// What the connection must do, in order, after a request was handled. Fds
/// are named by their index in the message; any received fd no effect claims
/// is closed by the connection.
public enum SessionEffect: Equatable, Sendable {
    case reply([UInt8])
    /// Carry out `plan`, which takes access away, then send `reply` — the
    /// front end's ack to the request — only once VM2 gave that access up
    /// (whichever thread sees VM2's acknowledgement first may send it).
    case windowThenReply(WindowPlan, reply: [UInt8])
    /// GET_VRING_BASE on a running ring: stop it at the device (VM2) and
    /// learn how far it got — `noteDeviceProgress` — before the reply
    /// (`replyVringBase`). `layout` is the ring's, as it ran.
    case stopRingAtDevice(index: Int, VringLayout?)
    /// Answer GET_VRING_BASE with ring `index`'s base as it is when this
    /// effect is carried out (`vringBaseReply`), after `stopRingAtDevice`.
    case replyVringBase(index: Int)
    /// Take ownership of the message's fd as the backing of `region`.
    /// Always comes before the window plan that maps it.
    case adoptRegionFile(RegionID, fdIndex: Int)
    case window(WindowPlan)
    /// Close the fd backing `region` (after the plan that unmapped it).
    case releaseRegionFile(RegionID)
    /// Replace vring `index`'s kick/call/err fd (nil: none, i.e. polling);
    /// the old one is closed.
    case setVringFile(VringFileKind, index: Int, fdIndex: Int?)
    case adoptBackendChannel(fdIndex: Int)
    /// Send on the back-end channel (an IOTLB miss).
    case sendBackend([UInt8])
    /// A ring needs `bus` mapped with `permission` before it can start: raise
    /// an IOTLB miss (`missMessage`) unless one for that page is still
    /// outstanding — the connection keeps track (`OutstandingMisses`).
    case raiseMiss(bus: BusAddress, permission: Permission)
    case ringStarted(index: Int, VringLayout)
    case ringStopped(index: Int)
    /// The device starts (just before its first ring) or stops (just after
    /// its last ring stopped), with VM1's negotiated features.
    case deviceStarted(features: UInt64)
    case deviceStopped(features: UInt64)
    /// The session ended: whatever VM2 held of it is gone.
    case deviceReset
    case ringEnabled(index: Int, Bool)
    /// Take ownership of the message's fd as the dirty log (`area` in it);
    /// the previous log, if any, is closed.
    case adoptLogFile(fdIndex: Int, DirtyLogArea)
    /// Close the dirty log (logging stopped, or its replacement was refused).
    case releaseLogFile
    /// Make VM2's device log its writes into the log file (`area`), or stop
    /// logging (nil) — then send `reply`. A VM2 that cannot log (it did not
    /// negotiate `dirtyLog`, failed to map the log, or is lost meanwhile)
    /// makes the session learn it (`deviceLogFailed`) and `refusal` go
    /// instead; without a refusal to send, the connection closes. No VM2
    /// connected: nothing is written into VM1's memory, the reply goes.
    case deviceLog(DirtyLogArea?, reply: [UInt8]?, refusal: [UInt8]?)

    /// VM1 logs from now on and its log follows (QEMU starts a device
    /// during a migration with LOG_ALL before SET_LOG_BASE): the attached
    /// VM2 must be able to log (else `deviceLogFailed` and `refusal`; nil:
    /// the connection closes), and no ring goes to VM2 until the log is
    /// there (`BackendSession.logPending`). Then `reply`.
    case awaitLog(reply: [UInt8]?, refusal: [UInt8]?)

    /// `deviceLog` or `awaitLog` that starts logging with no answer attached yet.
    var startsLoggingUnanswered: Bool {
        switch self {
        case .deviceLog(let area, nil, nil): area != nil
        case .awaitLog(nil, nil): true
        default: false
        }
    }

    /// The same, answered with `reply` or, failing, `refusal`.
    func answered(_ reply: [UInt8], refusal: [UInt8]) -> SessionEffect {
        switch self {
        case .deviceLog(let area, _, _): .deviceLog(area, reply: reply, refusal: refusal)
        case .awaitLog: .awaitLog(reply: reply, refusal: refusal)
        default: self
        }
    }
}
