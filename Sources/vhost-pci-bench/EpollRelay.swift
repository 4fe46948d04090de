import LinuxIO
import Synchronization

/// The usual way to relay eventfds, kept as the benchmark baseline: one thread,
/// epoll_wait, then read(2) the source and write(2) the target per ready fd.
final class EpollRelay: Sendable {
    private let epoll: Epoll
    private let stopSignal: EventFD
    private let pairs: [(source: EventFD, target: EventFD)]
    private let thread = Locked<JoinableThread?>(nil)
    private let relayed = Atomic<UInt64>(0)

    /// Relays `source[i] → target[i]`; takes ownership of the fds.
    public init(_ pairs: [(source: OwnedFileDescriptor, target: OwnedFileDescriptor)]) throws(SystemCallError) {
        epoll = try Epoll()
        stopSignal = try EventFD()
        self.pairs = pairs.map { (EventFD(adopting: $0.source), EventFD(adopting: $0.target)) }
        try epoll.add(stopSignal.fd.rawValue, data: UInt64.max)
        for (i, p) in pairs.enumerated() { try epoll.add(p.source.rawValue, data: UInt64(i)) }
        let t = try JoinableThread(name: "epoll-relay") { [self] in self.run() }
        thread.withLock { $0 = t }
    }

    public var wakeups: UInt64 { relayed.load(ordering: .relaxed) }
    /// CPU time the relay thread has used so far (ns), read from its clock.
    public var threadCPUNanoseconds: UInt64 { thread.withLock { $0?.cpuTimeNanoseconds } ?? 0 }

    private func run() {
        while true {
            guard let ready = try? epoll.wait() else { return }
            for data in ready {
                if data == UInt64.max { return }
                let p = pairs[Int(data)]
                // read(2) the counter, write(2) the value read to the target.
                guard let value = (try? p.source.read()) ?? nil, EventFD.add(value, to: p.target.fd.rawValue) == .added else { continue }
                relayed.add(1, ordering: .relaxed)
            }
        }
    }

    public func stop() {
        _ = try? stopSignal.signal()
        let t = thread.withLock { t -> JoinableThread? in defer { t = nil }; return t }
        t?.join()
    }

    deinit { stop() }
}
