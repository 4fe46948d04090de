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
    final class Link: RelayLink {
        let id: NotificationRelay.LinkID
        let source: OwnedFileDescriptor
        var target: OwnedFileDescriptor?
        var life: RelayLinkLife<OwnedFileDescriptor> = .active
        var sourceBroken = false
        var delta = RelayLinkStatistics()
        var dirty = false
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
        }
        for link in links.values { close(link) }
        links = [:]
    }

    func relayOnce(_ link: Link) {
        batch.touch(link)
        let (value, failure) = EventFD.take(from: link.source.rawValue)
        guard let value else {
            if failure != nil {
                count(.sourceFailed, on: link)
                epoll.remove(link.source.rawValue)
                link.sourceBroken = true
            }
            return // the peer drained it first: nothing to relay
        }
        count(.took(value), on: link)
        guard let target = writableTarget(of: link, for: value) else { return }
        switch EventFD.add(1, to: target.rawValue) { // POLLOUT promised room for 1, never for the value read
        case .added: count(.relayed, on: link)
        case .full: count(.coalesced(value), on: link)
        case .failed: count(.writeFailed(dropping: value), on: link)
        }
    }
}

/// The shared link bookkeeping (`RelayLinkEngine`): nothing is ever in
/// flight here, so a retarget or removal settles at once; a source stays in
/// the epoll set until its link is closed.
extension EpollRelayEngine: RelayLinkEngine {
    func makeLink(id: NotificationRelay.LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?) -> Link {
        Link(id: id, source: source, target: target)
    }
    func watch(_ link: Link) {
        do { try epoll.add(link.source.rawValue, data: UInt64(link.id.rawValue)) } catch {
            link.sourceBroken = true
            count(.sourceFailed, on: link)
        }
    }
    func hasInFlight(_ link: Link) -> Bool { false }
    func cancelInFlight(_ link: Link) {}
    func resume(_ link: Link) {}
    func unwatch(_ link: Link) {
        if !link.sourceBroken { epoll.remove(link.source.rawValue) }
    }
}
