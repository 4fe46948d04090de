import BridgeCore
import LinuxIO
import VhostUser

public enum DeadlineAction: String, Sendable, Equatable {
    case disconnect, kill
}

/// What VM2 gets of VM1 memory that is not sealed against shrinking (QEMU
/// `seal=off`, hugetlbfs files, DPDK's memory): VM1 can truncate it, and a
/// VM2 touching it afterwards takes SIGBUS.
public enum UnsealedRegionPolicy: String, Sendable, Equatable, CaseIterable {
    /// Never sent to VM2: its ranges are in the daemon's window (what VM2
    /// may have) but no MAP carries them (rule `unsealed-region`).
    case refuse
    /// Sent with MAP's unsealed flag to a VM2 that negotiated the peer
    /// feature `unsealedMaps` (it guards its accesses); to any other VM2, as
    /// with `refuse`. The default: DPDK's memory is never sealed.
    case mark
}

/// Everything that defines one bridge (flags and the config file mean the
/// same thing).
public struct BridgeSettings: Sendable, Equatable {
    public var name: String
    /// Where the vhost-user socket listens.
    public var socketPath: String?
    /// Where VM2 connects (the peer protocol); nil: no VM2 side.
    public var peerSocketPath: String?
    public var backend: BackendConfiguration
    /// How long VM2 has to acknowledge a revocation before it is disconnected.
    public var revocationDeadlineMilliseconds: Int
    /// How long the bridge thread spins on VM2's ack in the revocation
    /// channel (peer feature `sharedRevocations`) before it sleeps on it.
    public var revocationSpinMicroseconds = 50
    /// How vring notifications travel between VM1 and VM2.
    public var notifications: NotificationMode
    /// Relay modes: spin this long reaping completions before blocking.
    public var busyPollMicroseconds: Int
    /// Connect to `socketPath` (created by the front end, e.g. QEMU
    /// `server=on`) instead of listening, and reconnect whenever it drops —
    /// so the daemon can restart under a running VM.
    public var client: Bool = false
    /// VM2 translation requests that may wait on VM1 at once; more are
    /// refused (`translation-limit`).
    public var maxPendingTranslations: Int = BridgeSettings.defaultMaxPendingTranslations
    public static let defaultMaxPendingTranslations = 256
    /// Who may connect to the vhost-user socket (VM1's VMM) and to the peer
    /// socket (VM2's VMM).
    public var vm1Access = PeerAccess()
    public var vm2Access = PeerAccess()
    /// What happens to a VM2 that misses the revocation deadline: it is
    /// always disconnected; `kill` also sends its VMM SIGKILL (through a
    /// pidfd taken when it connected).
    public var vm2DeadlineAction: DeadlineAction = .disconnect
    /// Unsealed VM1 memory: `mark` (the default) or `refuse`.
    public var unsealedRegions: UnsealedRegionPolicy = .mark
    /// CPUs the relay thread (and, in relay-sqpoll mode, the SQPOLL kernel
    /// thread: the first of them) may run on; empty: wherever the daemon may.
    public var cpuAffinity: [Int] = []

    public init(name: String, socketPath: String?, peerSocketPath: String? = nil, backend: BackendConfiguration,
                revocationDeadlineMilliseconds: Int = 100, notifications: NotificationMode = .relay,
                busyPollMicroseconds: Int = 0) {
        self.name = name
        self.socketPath = socketPath
        self.peerSocketPath = peerSocketPath
        self.backend = backend
        self.revocationDeadlineMilliseconds = revocationDeadlineMilliseconds
        self.notifications = notifications
        self.busyPollMicroseconds = busyPollMicroseconds
    }
}

public enum BridgeError: Error, CustomStringConvertible {
    case configuration(String, ConfigurationError)
    case window(String, BARWindowError)
    case socket(String, String, SystemCallError)
    case relay(String, RelayError)

    public var description: String {
        switch self {
        case .configuration(let name, let e): "bridge \(name): \(e)"
        case .window(let name, let e): "bridge \(name): BAR window: \(e)"
        case .socket(let name, let which, let e): "bridge \(name): \(which) socket: \(e)"
        case .relay(let name, let e): "bridge \(name): \(e)"
        }
    }
}
