import BridgeCore
import LinuxIO

/// What the relay counts, one event at a time. Both engines (io_uring,
/// epoll) count through `RelayLinkStatistics.count(_:)`, saturating: the
/// values come from eventfds a peer writes.
enum RelayEvent: Equatable, Sendable {
    /// A read took `value` from the source: one wakeup carrying `value`
    /// notifications, all but one folded into it.
    case took(UInt64)
    /// A write of 1 reached the target.
    case relayed
    /// The target's counter had no room: its reader has a wakeup pending,
    /// which stands for these `value` notifications too.
    case coalesced(UInt64)
    /// Nowhere to go: no target, or the link is being retargeted or removed.
    case dropped(UInt64)
    /// The write failed; what it carried is lost.
    case writeFailed(dropping: UInt64)
    /// The source failed (a read error, or it could not be watched).
    case sourceFailed
}

extension RelayLinkStatistics {
    mutating func count(_ event: RelayEvent) {
        switch event {
        case .took(let value):
            notifications.addSaturating(value)
            wakeups.addSaturating(1)
            coalesced.addSaturating(value > 0 ? value - 1 : 0)
        case .relayed:
            relayed.addSaturating(1)
        case .coalesced(let value):
            coalesced.addSaturating(value)
        case .dropped(let value):
            dropped.addSaturating(value)
        case .writeFailed(let value):
            dropped.addSaturating(value)
            errors.addSaturating(1)
        case .sourceFailed:
            errors.addSaturating(1)
        }
    }
}

/// A link's life from its add to its close. A retarget or a removal asked
/// while the link has operations in flight waits here until they ended
/// (`settle`); an engine with nothing in flight settles at once.
enum RelayLinkLife<Descriptor> {
    /// Relaying to the link's current target.
    case active
    /// A new target (nil: drop from then on) replaces the current one at the
    /// next settle.
    case retargeting(to: Descriptor?)
    /// Closed at the next settle.
    case removing

    /// What `settle` tells the engine to do with a link that has nothing in flight.
    enum Settlement {
        /// Close its fds and forget it.
        case close
        /// Close the current target and relay to this one.
        case retarget(Descriptor?)
        /// Carry on.
        case resume
    }

    /// Whether a notification taken now can still go to the current target.
    var isActive: Bool {
        if case .active = self { true } else { false }
    }

    /// A retarget is asked. Returns the descriptor it supersedes, for the
    /// engine to close now: a retarget asked before and not settled yet, or
    /// `target` itself when the link is being removed.
    mutating func retarget(to target: Descriptor?) -> Descriptor? {
        switch self {
        case .active:
            self = .retargeting(to: target)
            return nil
        case .retargeting(let superseded):
            self = .retargeting(to: target)
            return superseded
        case .removing:
            return target
        }
    }

    /// A removal is asked. Returns a pending retarget's descriptor, which no
    /// longer has a use, for the engine to close now.
    mutating func remove() -> Descriptor? {
        defer { self = .removing }
        if case .retargeting(let superseded) = self { return superseded }
        return nil
    }

    /// Nothing of the link is in flight any more: what to do now. A
    /// retarget leaves the link active again.
    mutating func settle() -> Settlement {
        switch self {
        case .active:
            return .resume
        case .retargeting(let target):
            self = .active
            return .retarget(target)
        case .removing:
            return .close
        }
    }

    /// The descriptor a pending retarget holds (to close when the relay stops).
    var pendingTarget: Descriptor? {
        if case .retargeting(let target) = self { target } else { nil }
    }
}

extension RelayLinkLife: Equatable where Descriptor: Equatable {}
extension RelayLinkLife.Settlement: Equatable where Descriptor: Equatable {}

/// A relay engine's link as far as the shared bookkeeping goes.
protocol RelayLink: AnyObject {
    var id: NotificationRelay.LinkID { get }
    var source: OwnedFileDescriptor { get }
    var target: OwnedFileDescriptor? { get set }
    var life: RelayLinkLife<OwnedFileDescriptor> { get set }
    /// The source failed (not EAGAIN): it is no longer watched or re-armed,
    /// so a broken fd cannot spin the thread; a retarget or removal follows.
    var sourceBroken: Bool { get set }
    /// Counters since the last flush to the shared statistics.
    var delta: RelayLinkStatistics { get set }
    var dirty: Bool { get set }
}

/// The links whose counters changed in the current batch, flushed to the
/// relay's shared statistics once per batch (one lock, not one per event).
struct StatisticsBatch<Link: RelayLink> {
    private var links: [Link] = []

    mutating func touch(_ link: Link) {
        if !link.dirty { link.dirty = true; links.append(link) }
    }

    mutating func flush(to relay: NotificationRelay) {
        guard !links.isEmpty else { return }
        var changes: [NotificationRelay.LinkID: RelayLinkStatistics] = [:]
        changes.reserveCapacity(links.count)
        for link in links {
            changes[link.id] = link.delta
            link.delta = RelayLinkStatistics()
            link.dirty = false
        }
        links.removeAll(keepingCapacity: true)
        relay.updateMany(changes)
    }
}

/// The link bookkeeping both relay engines share: the links by id, their
/// counters, the commands (add, retarget, remove, stop), a link's life and
/// its close, and where a notification may be written. An engine supplies
/// only how it watches a source and what it has in flight.
protocol RelayLinkEngine: AnyObject {
    associatedtype Link: RelayLink
    var relay: NotificationRelay { get }
    var links: [UInt32: Link] { get set }
    var batch: StatisticsBatch<Link> { get set }
    var running: Bool { get set }

    func makeLink(id: NotificationRelay.LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?) -> Link
    /// A new link: start watching its source.
    func watch(_ link: Link)
    /// Whether operations of `link` are in flight (a retarget or removal waits for them).
    func hasInFlight(_ link: Link) -> Bool
    /// Ends what is in flight; the engine calls `settle` when the last completed.
    func cancelInFlight(_ link: Link)
    /// Watches the source again after a settle.
    func resume(_ link: Link)
    /// Stops watching the source before it is closed.
    func unwatch(_ link: Link)
}

extension RelayLinkEngine {
    func count(_ event: RelayEvent, on link: Link) {
        batch.touch(link)
        link.delta.count(event)
    }

    func flushStatistics() { batch.flush(to: relay) }

    func apply(_ command: NotificationRelay.Command) {
        switch command {
        case .add(let id, let source, let target):
            let link = makeLink(id: id, source: source, target: target)
            links[id.rawValue] = link
            watch(link)
        case .retarget(let id, let target):
            guard let link = links[id.rawValue] else { try? target?.close(); relay.retargeted(id); return }
            try? link.life.retarget(to: target)?.close()
            if hasInFlight(link) { cancelInFlight(link) } else { settle(link) }
        case .remove(let id):
            guard let link = links[id.rawValue] else { return }
            try? link.life.remove()?.close()
            if hasInFlight(link) { cancelInFlight(link) } else { settle(link) }
        case .stop:
            running = false
        }
    }

    /// A link with nothing in flight: close it, apply a retarget, or carry
    /// on. A source that broke is not watched again (no busy loop): the link
    /// waits for its removal; its counters show errors.
    func settle(_ link: Link) {
        switch link.life.settle() {
        case .close:
            links[link.id.rawValue] = nil
            close(link)
            return
        case .retarget(let target):
            try? link.target?.close()
            link.target = target
            relay.retargeted(link.id)
        case .resume:
            break
        }
        if link.sourceBroken { return }
        if running { resume(link) }
    }

    /// Closes every fd of `link` exactly once (nothing of it may be in flight).
    func close(_ link: Link) {
        flushStatistics()
        unwatch(link)
        try? link.source.close()
        try? link.target?.close()
        try? link.life.pendingTarget?.close()
        relay.finished(link.id)
    }

    /// Where a notification of `value` taken from `link` goes now: its
    /// target when the link is active and a zero-timeout POLLOUT check
    /// promises room for one write of 1. Else nil, counted: dropped (no
    /// target, or the link is being retargeted or removed) or coalesced (a
    /// full counter: its reader has a wakeup pending).
    func writableTarget(of link: Link, for value: UInt64) -> OwnedFileDescriptor? {
        guard link.life.isActive, let target = link.target else {
            count(.dropped(value), on: link)
            return nil
        }
        guard (try? Poll.writable(target.rawValue)) == true else {
            count(.coalesced(value), on: link)
            return nil
        }
        return target
    }
}
