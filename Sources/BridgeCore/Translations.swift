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
/// one entry (and so one miss) — but each keeps its own deadline: a request
/// merged into an older one times out when its own time is up, not the
/// older one's. Pure: the caller passes the time.
public struct PendingTranslations: Sendable {
    public struct Entry: Equatable, Sendable {
        public var bus: BusAddress
        public var length: UInt64
        public var access: Permission
        /// The VM2 connection that asked; answers go to it only.
        public var owner: Int
        /// Every request waiting on this range, oldest first, each with its deadline.
        public var waiters: [Waiter]

        /// Every request id waiting on this range, oldest first.
        public var ids: [UInt64] { waiters.map(\.id) }
        /// The earliest deadline of its requests.
        public var deadline: ContinuousClock.Instant? { waiters.map(\.deadline).min() }

        /// The range and access every request of this entry asked for.
        public var request: TranslationRequest { TranslationRequest(id: 0, bus: bus, length: length, access: access) }
    }

    /// One request waiting in an entry.
    public struct Waiter: Equatable, Sendable {
        public var id: UInt64
        public var deadline: ContinuousClock.Instant
        public init(id: UInt64, deadline: ContinuousClock.Instant) { self.id = id; self.deadline = deadline }
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
            entries[i].waiters.append(Waiter(id: request.id, deadline: deadline))
            return .merged
        }
        entries.append(Entry(bus: request.bus, length: request.length, access: request.access, owner: owner,
                             waiters: [Waiter(id: request.id, deadline: deadline)]))
        return .queued
    }

    /// Removes and returns the entries `isDone` says are settled (granted or
    /// refused for good); the others keep waiting.
    public mutating func settle(_ isDone: (Entry) -> Bool) -> [Entry] {
        settle { isDone($0) ? () : nil }.map(\.entry)
    }

    /// Removes the entries `decide` has a result for, and returns each with
    /// its result, in order; the others keep waiting.
    public mutating func settle<R>(_ decide: (Entry) -> R?) -> [(entry: Entry, result: R)] {
        var done: [(entry: Entry, result: R)] = []
        var kept: [Entry] = []
        for entry in entries {
            if let result = decide(entry) { done.append((entry, result)) } else { kept.append(entry) }
        }
        entries = kept
        count -= done.reduce(0) { $0 + $1.entry.waiters.count }
        return done
    }

    /// Removes and returns the requests whose deadline passed, grouped by
    /// entry (each returned entry holds just those); the requests of an
    /// entry whose deadline has not passed keep waiting in it.
    public mutating func expire(now: ContinuousClock.Instant) -> [Entry] {
        var expired: [Entry] = []
        var kept: [Entry] = []
        for entry in entries {
            var late = entry, waiting = entry
            late.waiters = entry.waiters.filter { $0.deadline <= now }
            waiting.waiters = entry.waiters.filter { $0.deadline > now }
            if !late.waiters.isEmpty { expired.append(late) }
            if !waiting.waiters.isEmpty { kept.append(waiting) }
        }
        entries = kept
        count -= expired.reduce(0) { $0 + $1.waiters.count }
        return expired
    }

    /// Removes and returns the entries of connection `owner` (it went away:
    /// nobody is left to answer), or of every connection when nil.
    public mutating func removeAll(owner: Int? = nil) -> [Entry] {
        settle { owner == nil || $0.owner == owner }
    }

    public var nextDeadline: ContinuousClock.Instant? { entries.compactMap(\.deadline).min() }
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
    private func key(_ bus: BusAddress, _ permission: Permission) -> Key {
        Key(page: bus.rawValue - bus.rawValue % pageSize, permission: permission.rawValue)
    }

    public mutating func shouldRaise(_ bus: BusAddress, permission: Permission, now: ContinuousClock.Instant) -> Bool {
        let key = key(bus, permission)
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
        let keep = Set(needed.map { key($0.bus, $0.permission) })
        raised = raised.filter { keep.contains($0.key) || now < $0.value.advanced(by: retryInterval) }
    }

    public mutating func removeAll() { raised = [:] }

    /// When the oldest outstanding miss may be raised again.
    public var nextRetry: ContinuousClock.Instant? { raised.values.min().map { $0.advanced(by: retryInterval) } }
}

/// Every decision about VM2's translation requests, in one pure type: what to
/// answer, when to wait for VM1, which IOTLB misses to raise, when to give up.
/// The connection carries out its actions (sends MAPs, replies and misses)
/// and passes the time and the address space in; nothing here does I/O.
public struct TranslationBroker: Sendable {
    public enum Verdict: Equatable, Sendable {
        case granted
        case refused(reason: String, rule: String)
        case timedOut
    }

    public enum Action: Equatable, Sendable {
        /// Send VM2 (connection `owner`) the MAPs of these already mapped pieces.
        case sendMaps([Mapping], owner: Int)
        /// Answer requests `ids` (all for `request`'s range) on connection `owner` only.
        case answer(ids: [UInt64], request: TranslationRequest, owner: Int, Verdict)
        /// Raise an IOTLB miss toward VM1 (already de-duplicated).
        case raiseMiss(bus: BusAddress, permission: Permission)
    }

    public let deadline: Duration
    private(set) public var pending: PendingTranslations
    private var misses: OutstandingMisses

    public init(capacity: Int, pageSize: UInt64, deadline: Duration, missRetryInterval: Duration) {
        self.deadline = deadline
        pending = PendingTranslations(capacity: capacity)
        misses = OutstandingMisses(pageSize: pageSize, retryInterval: missRetryInterval)
    }

    /// VM2 (connection `owner`) asks for `request`. `canRaiseMisses`: VM1 has
    /// a back-end channel and negotiated IOMMU_PLATFORM.
    public mutating func request(_ request: TranslationRequest, owner: Int, space: AddressSpace, canRaiseMisses: Bool,
                                 now: ContinuousClock.Instant) -> [Action] {
        let refuse = { (e: AddressSpaceError) -> [Action] in
            [.answer(ids: [request.id], request: request, owner: owner, .refused(reason: "\(e)", rule: e.rule))]
        }
        let missing: BusAddress
        do throws(AddressSpaceError) {
            let pieces = try space.checkAccess(request.bus, length: request.length, needed: request.access, purpose: .translation)
            return [.sendMaps(Self.wholeMappings(pieces, space), owner: owner), .answer(ids: [request.id], request: request, owner: owner, .granted)]
        } catch {
            // A policy refusal (BAR, DMA window, static window) names that rule.
            do throws(AddressSpaceError) { try space.checkTranslatable(request.bus, length: request.length) } catch { return refuse(error) }
            guard case .notMapped(_, _, _, let first) = error, space.mode != .identity else { return refuse(error) }
            guard canRaiseMisses else {
                return [.answer(ids: [request.id], request: request, owner: owner,
                                .refused(reason: "\(error); VM1 has no back-end channel to raise an IOTLB miss on", rule: error.rule))]
            }
            missing = first
        }
        // Unmapped but a range VM1 could map: wait for its update.
        switch pending.admit(request, owner: owner, deadline: now.advanced(by: deadline)) {
        case .full(let capacity):
            return [.answer(ids: [request.id], request: request, owner: owner,
                            .refused(reason: "[translation-limit] \(capacity) translations already wait for VM1", rule: "translation-limit"))]
        case .queued, .merged:
            return miss(missing, request.access, now: now)
        }
    }

    /// The whole mappings holding `pieces`: a MAP must be page (or huge
    /// page) aligned for VM2 to mmap it, and the pieces of an access check
    /// are clipped to the bytes asked for (a 0x5e8-byte packet buffer was
    /// sent as a 0x5e8-byte MAP, which VM2 cannot map; found by the VM2-kill
    /// fault test).
    static func wholeMappings(_ pieces: [Mapping], _ space: AddressSpace) -> [Mapping] {
        var out: [Mapping] = []
        for piece in pieces {
            let whole = space.lookup(piece.bus) ?? piece
            if out.last != whole { out.append(whole) }
        }
        return out
    }

    /// A miss for `bus`, unless one for that page and access is outstanding.
    public mutating func miss(_ bus: BusAddress, _ permission: Permission, now: ContinuousClock.Instant) -> [Action] {
        misses.shouldRaise(bus, permission: permission, now: now) ? [.raiseMiss(bus: bus, permission: permission)] : []
    }

    /// After VM1 (or the operator) granted something: forget the misses it
    /// answered, answer what it satisfied, refuse what can no longer be, and
    /// raise a miss for each waiting range's next unmapped page if that is new.
    public mutating func settle(space: AddressSpace, ringNeeds: [(bus: BusAddress, permission: Permission)],
                                now: ContinuousClock.Instant) -> [Action] {
        misses.forget { bus, permission in (try? space.checkAccess(bus, length: 1, needed: permission)) != nil }
        // One check per waiting range: granted, refused for good, or still
        // waiting (nil) for VM1 to map the rest.
        let settled = pending.settle { entry -> Verdict? in
            do throws(AddressSpaceError) {
                try space.checkAccess(entry.bus, length: entry.length, needed: entry.access, purpose: .translation)
                return .granted
            } catch {
                if case .notMapped = error { return nil }
                return .refused(reason: "\(error)", rule: error.rule)
            }
        }
        let answers = settled.map { Action.answer(ids: $0.entry.ids, request: $0.entry.request, owner: $0.entry.owner, $0.result) }
        return answers + raiseStillNeeded(space: space, ringNeeds: ringNeeds, now: now)
    }

    /// One miss per page still needed by a waiting translation or ring; misses
    /// nobody needs any more (and whose interval passed) are forgotten.
    private mutating func raiseStillNeeded(space: AddressSpace, ringNeeds: [(bus: BusAddress, permission: Permission)],
                                           now: ContinuousClock.Instant) -> [Action] {
        var needed = ringNeeds
        for entry in pending.entries {
            do throws(AddressSpaceError) {
                try space.checkAccess(entry.bus, length: entry.length, needed: entry.access, purpose: .translation)
            } catch {
                if case .notMapped(_, _, _, let missing) = error { needed.append((missing, entry.access)) }
            }
        }
        var actions: [Action] = []
        for (bus, permission) in needed { actions += miss(bus, permission, now: now) }
        misses.keepOnly(needed, now: now)
        return actions
    }

    /// Times out what waited too long and raises again the misses whose
    /// interval passed. Returns the actions and when to call again.
    /// `ringNeeds` is only evaluated when a miss is due again (this runs on
    /// every wakeup of the bridge thread).
    public mutating func expire(space: AddressSpace, ringNeeds: @autoclosure () -> [(bus: BusAddress, permission: Permission)],
                                now: ContinuousClock.Instant) -> (actions: [Action], next: ContinuousClock.Instant?) {
        var actions: [Action] = pending.expire(now: now).map { entry in
            .answer(ids: entry.ids, request: entry.request, owner: entry.owner, .timedOut)
        }
        if let retry = misses.nextRetry, retry <= now { actions += raiseStillNeeded(space: space, ringNeeds: ringNeeds(), now: now) }
        return (actions, [pending.nextDeadline, misses.nextRetry].compactMap { $0 }.min())
    }

    /// VM2 connection `owner` is gone: nobody is left to answer its requests.
    public mutating func drop(owner: Int, space: AddressSpace, ringNeeds: [(bus: BusAddress, permission: Permission)],
                              now: ContinuousClock.Instant) -> [Action] {
        _ = pending.removeAll(owner: owner)
        return raiseStillNeeded(space: space, ringNeeds: ringNeeds, now: now)
    }

    /// The VM1 session ended: every waiting request is refused.
    public mutating func endSession() -> [Action] {
        misses.removeAll()
        return pending.removeAll().map { entry in
            .answer(ids: entry.ids, request: entry.request, owner: entry.owner, .refused(reason: "the VM1 session ended", rule: "session-ended"))
        }
    }
}
