/// A VM2 translation request (the peer protocol's TRANSLATE), as the pure
/// core sees it.
public struct TranslationRequest: Equatable, Sendable {
    public var id: UInt64
    public var bus: BusAddress
    public var length: UInt64
    public var access: Permission
    public init(id: UInt64, bus: BusAddress, length: UInt64, access: Permission) {
        self.id = id; self.bus = bus; self.length = length; self.access = access
    }
}

/// Translations VM2 asked for that wait on VM1 (an IOTLB miss is out), with
/// their deadlines. Bounded: at most `capacity` requests wait at once, per
/// bridge (one VM2 at a time), and identical requests of one connection share
/// one entry (and so one miss). Pure: the caller passes the time.
public struct PendingTranslations: Sendable {
    public struct Entry: Equatable, Sendable {
        public var bus: BusAddress
        public var length: UInt64
        public var access: Permission
        /// The VM2 connection that asked; answers go to it only.
        public var owner: Int
        /// Every request id waiting on this range, oldest first.
        public var ids: [UInt64]
        public var deadline: ContinuousClock.Instant
    }

    public enum Admission: Equatable, Sendable {
        /// A new range: raise a miss for it.
        case queued
        /// Same range, access and connection as one already waiting: no new miss.
        case merged
        /// `capacity` requests already wait.
        case full(capacity: Int)
    }

    public let capacity: Int
    public private(set) var entries: [Entry] = []
    /// Requests waiting (ids, over every entry).
    public private(set) var count = 0

    public init(capacity: Int) { self.capacity = max(1, capacity) }

    public var isEmpty: Bool { entries.isEmpty }

    public mutating func admit(_ request: TranslationRequest, owner: Int, deadline: ContinuousClock.Instant) -> Admission {
        guard count < capacity else { return .full(capacity: capacity) }
        count += 1
        if let i = entries.firstIndex(where: { $0.owner == owner && $0.bus == request.bus && $0.length == request.length && $0.access == request.access }) {
            entries[i].ids.append(request.id)
            return .merged
        }
        entries.append(Entry(bus: request.bus, length: request.length, access: request.access, owner: owner,
                             ids: [request.id], deadline: deadline))
        return .queued
    }

    /// Removes and returns the entries `isDone` says are settled (granted or
    /// refused for good); the others keep waiting.
    public mutating func settle(_ isDone: (Entry) -> Bool) -> [Entry] {
        var done: [Entry] = []
        entries.removeAll { entry in
            guard isDone(entry) else { return false }
            done.append(entry)
            return true
        }
        count -= done.reduce(0) { $0 + $1.ids.count }
        return done
    }

    /// Removes and returns the entries whose deadline passed.
    public mutating func expire(now: ContinuousClock.Instant) -> [Entry] {
        settle { $0.deadline <= now }
    }

    /// Removes and returns the entries of connection `owner` (it went away:
    /// nobody is left to answer), or of every connection when nil.
    public mutating func removeAll(owner: Int? = nil) -> [Entry] {
        settle { owner == nil || $0.owner == owner }
    }

    public var nextDeadline: ContinuousClock.Instant? { entries.map(\.deadline).min() }
}

/// The IOTLB misses raised toward VM1 and not answered yet. A front end
/// answers every miss it gets, and a miss for an IOVA its guest already
/// unmapped makes the guest log a DMAR fault: so one miss per distinct page
/// and permission, raised again only after `retryInterval` — never because
/// some unrelated message arrived. Pure: the caller passes the time.
public struct OutstandingMisses: Sendable {
    private struct Key: Hashable, Sendable {
        var page: UInt64
        var permission: UInt8
    }
    public let pageSize: UInt64
    public let retryInterval: Duration
    private var raised: [Key: ContinuousClock.Instant] = [:]

    public init(pageSize: UInt64, retryInterval: Duration) {
        self.pageSize = max(1, pageSize)
        self.retryInterval = retryInterval
    }

    public var count: Int { raised.count }

    /// Whether a miss for `bus` with `permission` should go out now; when
    /// true, it is recorded as raised at `now`.
    public mutating func shouldRaise(_ bus: BusAddress, permission: Permission, now: ContinuousClock.Instant) -> Bool {
        let key = Key(page: bus.rawValue - bus.rawValue % pageSize, permission: permission.rawValue)
        if let at = raised[key], now < at.advanced(by: retryInterval) { return false }
        raised[key] = now
        return true
    }

    /// Forgets the misses `isAnswered` says are answered (VM1 mapped the
    /// page), so a later need for the same page raises a miss at once.
    public mutating func forget(where isAnswered: (BusAddress, Permission) -> Bool) {
        raised = raised.filter { key, _ in !isAnswered(BusAddress(key.page), Permission(rawValue: key.permission)) }
    }

    /// Forgets the misses nobody needs any more and whose retry interval
    /// passed. One raised less than an interval ago stays: VM1 still has it
    /// outstanding, so a VM2 that reconnects and asks again gets no new miss.
    public mutating func keepOnly(_ needed: [(bus: BusAddress, permission: Permission)], now: ContinuousClock.Instant) {
        let keep = Set(needed.map { Key(page: $0.bus.rawValue - $0.bus.rawValue % pageSize, permission: $0.permission.rawValue) })
        raised = raised.filter { keep.contains($0.key) || now < $0.value.advanced(by: retryInterval) }
    }

    public mutating func removeAll() { raised = [:] }

    /// When the oldest outstanding miss may be raised again.
    public var nextRetry: ContinuousClock.Instant? { raised.values.min().map { $0.advanced(by: retryInterval) } }
}
