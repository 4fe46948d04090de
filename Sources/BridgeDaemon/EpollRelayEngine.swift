import BridgeCore
import LinuxIO
import SystemPackage

/// The relay thread's engine when io_uring is not available (the kernel has
/// it disabled, or a container's seccomp policy refuses io_uring_setup): one
/// epoll set over the links' source eventfds and the control eventfd; a
/// ready source is read without blocking (it is shared with the peer, which
/// may drain it first) and one notification (the value 1) is written to the
/// target after a zero-timeout POLLOUT check, which promises room for 1.
/// Same commands, same counters; one syscall pair per notification instead
/// of a batch, which is the price of the fallback.
///
/// What this engine cannot promise (docs/security.md): Linux has no
/// per-write "never wait" for an eventfd (`pwritev2(RWF_NOWAIT)` is
/// EOPNOTSUPP on 6.18), so a peer that clears `O_NONBLOCK` on its target and
/// refills the counter between the POLLOUT check and the write(2) — a race
/// it must win on purpose — holds the relay thread until it reads its
/// counter. The io_uring engine has no such window.
final class EpollRelayEngine {
    final class Link: CountedLink {
        let id: NotificationRelay.LinkID
        var source: OwnedFileDescriptor
        var target: OwnedFileDescriptor?
        var delta = RelayLinkStatistics()
        var dirty = false
        /// The source failed (not EAGAIN): it is no longer watched, so a
        /// broken fd cannot spin the thread; a retarget or removal follows.
        var broken = false
        init(id: NotificationRelay.LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?) {
            self.id = id
            self.source = source
            self.target = target
        }
    }

    static let controlData = UInt64.max
    let epoll: Epoll
    unowned let relay: NotificationRelay
    var links: [UInt32: Link] = [:]
    var running = true
    var batch = StatisticsBatch<Link>()

    init(epoll: Epoll, relay: NotificationRelay) {
        self.epoll = epoll
        self.relay = relay
    }

    func touch(_ link: Link) { batch.touch(link) }

    func flushStatistics() { batch.flush(to: relay) }

    func run() {
        do { try epoll.add(relay.controlFD, data: Self.controlData) } catch {
            relay.fail("\(error)")
            return
        }
        while running {
            let ready: [UInt64]
            do { ready = try epoll.wait(max: 64, timeoutMilliseconds: -1) } catch {
                relay.fail("\(error)")
                break
            }
            for data in ready {
                if data == Self.controlData {
                    for command in relay.drainControl() { apply(command) }
                } else if let link = links[UInt32(truncatingIfNeeded: data)] {
                    relayOnce(link)
                }
            }
            flushStatistics()
            relay.cpu.store(ThreadCPUClock.nanoseconds(), ordering: .relaxed)
        }
        for link in links.values { close(link) }
        links = [:]
    }

    func relayOnce(_ link: Link) {
        touch(link)
        let (value, failure) = EventFD.take(from: link.source.rawValue)
        guard let value else {
            if failure != nil {
                link.delta.errors.addSaturating(1)
                epoll.remove(link.source.rawValue)
                link.broken = true
            }
            return // the peer drained it first: nothing to relay
        }
        link.delta.notifications.addSaturating(value)
        link.delta.wakeups.addSaturating(1)
        link.delta.coalesced.addSaturating(value > 0 ? value - 1 : 0)
        guard let target = link.target else {
            link.delta.dropped.addSaturating(value)
            return
        }
        guard (try? Poll.writable(target.rawValue)) == true else {
            link.delta.coalesced.addSaturating(value) // a full counter already has a wakeup pending
            return
        }
        switch EventFD.add(1, to: target.rawValue) { // POLLOUT promised room for 1, never for the value read
        case .added: link.delta.relayed.addSaturating(1)
        case .full: link.delta.coalesced.addSaturating(value)
        case .failed:
            link.delta.dropped.addSaturating(value)
            link.delta.errors.addSaturating(1)
        }
    }

    func close(_ link: Link) {
        flushStatistics()
        if !link.broken { epoll.remove(link.source.rawValue) }
        try? link.source.close()
        try? link.target?.close()
        relay.finished(link.id)
    }

    func apply(_ command: NotificationRelay.Command) {
        switch command {
        case .add(let id, let source, let target):
            let link = Link(id: id, source: source, target: target)
            links[id.rawValue] = link
            do { try epoll.add(source.rawValue, data: UInt64(id.rawValue)) } catch {
                link.broken = true
                link.delta.errors.addSaturating(1)
                touch(link)
            }
        case .retarget(let id, let target):
            guard let link = links[id.rawValue] else { try? target?.close(); relay.retargeted(id); return }
            try? link.target?.close()
            link.target = target
            relay.retargeted(id)
        case .remove(let id):
            guard let link = links.removeValue(forKey: id.rawValue) else { return }
            close(link)
        case .stop:
            running = false
        }
    }
}
