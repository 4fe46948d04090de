import ArgumentParser
import BridgeDaemon
import Foundation
import Histogram
import LinuxIO

/// One way of moving notifications between a "VM1" thread and a "VM2" thread.
enum Path: String, CaseIterable, Codable {
    case direct = "direct eventfd"
    case epoll = "epoll relay"
    case uring = "io_uring relay"
    case uringSQPoll = "io_uring relay + SQPOLL"
    case passthrough = "passthrough"
    case uringBlocking = "io_uring relay, blocking targets (bounded io-wq write)"
    case uringIOWQ = "io_uring linked write to blocking eventfd, unbounded (io-wq path)"

    /// The two rows the issue asks for as references are kept last.
    static let main: [Path] = [.direct, .epoll, .uring, .uringSQPoll, .passthrough, .uringBlocking, .uringIOWQ]
}

/// The fds each side uses for one vring, and what must be stopped afterwards.
struct Wiring: Sendable {
    /// VM1 kicks here / VM2 waits here.
    var kickWrite: [EventFD] = []
    var kickWait: [EventFD] = []
    /// VM2 rings the doorbell here / VM1 waits here.
    var callWrite: [EventFD] = []
    var callWait: [EventFD] = []
    var stop: @Sendable () -> Void = {}
    var relayWakeups: @Sendable () -> UInt64 = { 0 }
    /// The daemon's relay writes 1 per wakeup, not the value it read: there
    /// kicks are counted where it read them (its `notifications` counter),
    /// not by the values that arrive. nil: count the values that arrive.
    var kicksTaken: (@Sendable () -> UInt64)?
    /// CPU time of the relay thread so far (ns); 0 where nothing relays.
    var relayCPU: @Sendable () -> UInt64 = { 0 }
}

func wire(_ path: Path, vrings: Int) throws -> Wiring {
    var w = Wiring()
    switch path {
    case .direct:
        for _ in 0..<vrings {
            let k = try EventFD(), c = try EventFD()
            w.kickWrite.append(k); w.kickWait.append(k); w.callWrite.append(c); w.callWait.append(c)
        }
    case .passthrough:
        // VM1's eventfds handed to VM2 over a Unix socket, as the bridge does.
        let (a, b) = try UnixSocket.pair(.seqpacket)
        for _ in 0..<vrings {
            let k = try EventFD(), c = try EventFD()
            try a.send([1], fds: [k.fd.rawValue, c.fd.rawValue])
            let got = try b.receive(maxBytes: 1, maxFDs: 2)
            w.kickWrite.append(k); w.callWait.append(c)
            w.kickWait.append(EventFD(adopting: got.fds[0])); w.callWrite.append(EventFD(adopting: got.fds[1]))
        }
    case .epoll:
        var pairs: [(source: OwnedFileDescriptor, target: OwnedFileDescriptor)] = []
        for _ in 0..<vrings {
            let ks = try EventFD(), kt = try EventFD(), cs = try EventFD(), ct = try EventFD()
            w.kickWrite.append(ks); w.kickWait.append(kt); w.callWrite.append(cs); w.callWait.append(ct)
            pairs.append((try ks.fd.duplicate(), try kt.fd.duplicate()))
            pairs.append((try cs.fd.duplicate(), try ct.fd.duplicate()))
        }
        let relay = try EpollRelay(pairs)
        w.stop = { relay.stop() }
        w.relayWakeups = { relay.wakeups }
        w.relayCPU = { relay.threadCPUNanoseconds }
    case .uringIOWQ:
        // Not the daemon's relay (which never takes this path): its own
        // linked writes without RWF_NOWAIT, to blocking targets.
        var pairs: [(source: OwnedFileDescriptor, target: OwnedFileDescriptor)] = []
        for _ in 0..<vrings {
            let ks = try EventFD(), kt = try EventFD(nonBlocking: false)
            let cs = try EventFD(), ct = try EventFD(nonBlocking: false)
            w.kickWrite.append(ks); w.kickWait.append(kt); w.callWrite.append(cs); w.callWait.append(ct)
            pairs.append((try ks.fd.duplicate(), try kt.fd.duplicate()))
            pairs.append((try cs.fd.duplicate(), try ct.fd.duplicate()))
        }
        let relay = try LinkedWriteRelay(pairs)
        w.stop = { relay.stop() }
        w.relayWakeups = { relay.wakeups }
        let kickPairs = Array(stride(from: 0, to: pairs.count, by: 2))
        w.kicksTaken = { relay.taken(kickPairs) }
        w.relayCPU = { relay.threadCPUNanoseconds }
    case .uring, .uringSQPoll, .uringBlocking:
        let blocking = path == .uringBlocking
        let relay = try NotificationRelay(mode: path == .uringSQPoll ? .relaySQPoll : .relay,
                                          entries: NotificationRelay.ringEntries(vrings: vrings))
        var ids: [NotificationRelay.LinkID] = []
        for _ in 0..<vrings {
            let ks = try EventFD(), kt = try EventFD(nonBlocking: !blocking)
            let cs = try EventFD(), ct = try EventFD(nonBlocking: !blocking)
            w.kickWrite.append(ks); w.kickWait.append(kt); w.callWrite.append(cs); w.callWait.append(ct)
            ids.append(try relay.add(source: try ks.fd.duplicate(), target: try kt.fd.duplicate()))
            ids.append(try relay.add(source: try cs.fd.duplicate(), target: try ct.fd.duplicate()))
        }
        w.stop = { relay.stop() }
        let linkIDs = ids
        w.relayWakeups = { linkIDs.reduce(0) { $0 + (relay.statistics($1)?.wakeups ?? 0) } }
        let kickIDs = stride(from: 0, to: ids.count, by: 2).map { ids[$0] }
        w.kicksTaken = { kickIDs.reduce(0) { $0 + (relay.statistics($1)?.notifications ?? 0) } }
        w.relayCPU = { relay.threadCPUNanoseconds }
    }
    return w
}

/// Waits for `e` to become readable, then reads it.
@inline(__always) func waitAndRead(_ e: EventFD) {
    while true {
        _ = try? Poll.readable([e.fd.rawValue], timeoutMilliseconds: 1000)
        if ((try? e.read()) ?? nil) != nil { return }
    }
}

struct LatencyResult: Codable {
    var p50: Double, p99: Double, p999: Double, mean: Double
}

/// Round trips VM1 → VM2 → VM1 over one vring, in microseconds.
func measureLatency(_ path: Path, rounds: Int) throws -> LatencyResult {
    let w = try wire(path, vrings: 1)
    defer { w.stop() }
    let total = rounds + rounds / 10
    let device = try JoinableThread(name: "vm2") {
        for _ in 0..<total {
            waitAndRead(w.kickWait[0])
            _ = try? w.callWrite[0].signal()
        }
    }
    var histogram = Histogram<UInt64>(highestTrackableValue: 10_000_000_000, numberOfSignificantValueDigits: .three)
    let clock = ContinuousClock()
    var sum: Double = 0
    for i in 0..<total {
        let t0 = clock.now
        try w.kickWrite[0].signal()
        waitAndRead(w.callWait[0])
        let ns = UInt64((t0.duration(to: clock.now) / .nanoseconds(1)).rounded(.down))
        if i >= total - rounds { _ = histogram.record(ns); sum += Double(ns) }
    }
    device.join()
    return LatencyResult(p50: Double(histogram.valueAtPercentile(50)) / 1000, p99: Double(histogram.valueAtPercentile(99)) / 1000,
                         p999: Double(histogram.valueAtPercentile(99.9)) / 1000, mean: sum / Double(rounds) / 1000)
}

struct ThroughputResult: Codable {
    var notificationsPerSecond: Double
    var wakeupsPerSecond: Double
    /// Relay thread CPU per delivered kick (ns); 0 without a relay.
    var relayCPUPerKick: Double
    /// Relay thread CPU per wakeup, i.e. per relayed notification (ns).
    var relayCPUPerWakeup: Double
}

/// One producer kicks `vrings` sources round-robin; one consumer drains all
/// targets until every kick arrived. Kicks are counted by value (or, for
/// the daemon's relay, which writes 1 per wakeup, where it read them), so a
/// relay that coalesces still accounts for every kick.
func measureThroughput(_ path: Path, vrings: Int, kicks: Int) throws -> ThroughputResult {
    let w = try wire(path, vrings: vrings)
    defer { w.stop() }
    let clock = ContinuousClock()
    let start = clock.now
    let cpuBefore = w.relayCPU()
    let producer = try JoinableThread(name: "kicker") {
        var i = 0
        while i < kicks {
            _ = try? w.kickWrite[i % vrings].signal()
            i += 1
        }
    }
    var seen: UInt64 = 0
    var consumerWakeups: UInt64 = 0
    let fds = w.kickWait.map { $0.fd.rawValue }
    while (w.kicksTaken?() ?? seen) < UInt64(kicks) {
        guard let ready = try? Poll.readable(fds, timeoutMilliseconds: w.kicksTaken == nil ? 1000 : 1) else { continue }
        for (i, r) in ready.enumerated() where r {
            if let v = (try? w.kickWait[i].read()) ?? nil { seen += v; consumerWakeups += 1 }
        }
    }
    let seconds = start.duration(to: clock.now) / .seconds(1)
    producer.join()
    let relayWakeups = w.relayWakeups()
    usleep(20_000) // let the relay thread finish its last batch
    let cpu = w.relayCPU() &- cpuBefore
    return ThroughputResult(notificationsPerSecond: Double(kicks) / seconds,
                            wakeupsPerSecond: Double(relayWakeups > 0 ? relayWakeups : consumerWakeups) / seconds,
                            relayCPUPerKick: Double(cpu) / Double(kicks),
                            relayCPUPerWakeup: relayWakeups > 0 ? Double(cpu) / Double(relayWakeups) : 0)
}

struct NotifyBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "notify",
        abstract: "Vring notification paths in one run: direct eventfd, epoll relay, io_uring relay (+SQPOLL), passthrough; latency and rate with ratios."
    )

    @Option(help: "Round trips measured per path (after a 10 % warm-up).")
    var rounds: Int = 20_000

    @Option(help: "Kicks per throughput run.")
    var kicks: Int = 1_000_000

    @Flag(help: "Print one JSON object instead of Markdown.")
    var json = false

    @Option(help: "Also write the Markdown to this file.")
    var output: String?

    struct Row: Codable {
        var path: String
        var latency: LatencyResult
        var oneVring: ThroughputResult
        var sixtyFourVrings: ThroughputResult
        var p50VersusDirect: Double
        var p50VersusEpoll: Double
        var rate64VersusEpoll: Double
        var wakeupsVersusEpoll: Double
        var cpuPerKickVersusEpoll: Double
    }

    func run() throws {
        var latency: [Path: LatencyResult] = [:]
        var rate1: [Path: ThroughputResult] = [:]
        var rate64: [Path: ThroughputResult] = [:]
        for path in Path.main {
            FileHandle.standardError.write(Data("notify: \(path.rawValue)…\n".utf8))
            let heavy = path == .uringIOWQ
            latency[path] = try measureLatency(path, rounds: heavy ? rounds / 4 : rounds)
            rate1[path] = try measureThroughput(path, vrings: 1, kicks: heavy ? kicks / 10 : kicks)
            rate64[path] = try measureThroughput(path, vrings: 64, kicks: heavy ? kicks / 10 : kicks)
        }
        guard let direct = latency[.direct], let epoll = latency[.epoll], let epoll64 = rate64[.epoll] else { return }
        let rows = Path.main.compactMap { p -> Row? in
            guard let l = latency[p], let r1 = rate1[p], let r64 = rate64[p] else { return nil }
            return Row(path: p.rawValue, latency: l, oneVring: r1, sixtyFourVrings: r64, p50VersusDirect: l.p50 / direct.p50,
                       p50VersusEpoll: l.p50 / epoll.p50,
                       rate64VersusEpoll: r64.notificationsPerSecond / max(1, epoll64.notificationsPerSecond),
                       wakeupsVersusEpoll: r64.wakeupsPerSecond / max(1, epoll64.wakeupsPerSecond),
                       cpuPerKickVersusEpoll: r64.relayCPUPerWakeup / max(0.001, epoll64.relayCPUPerWakeup))
        }
        var md = "### Notifications (`vhost-pci-bench notify`, \(rounds) round trips, \(kicks) kicks per rate run)\n\n"
        md += "Latency is a VM1 → VM2 → VM1 round trip (kick, then doorbell) between two threads. Rates: one thread kicks as fast as it can, "
        md += "another drains; a kick counts when its value arrives (eventfd counters coalesce bursts, so relays deliver every kick in fewer wakeups).\n\n"
        md += "Relay CPU is the relay thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`) per wakeup — one read of a source and one write to its target — "
        md += "in the 64-vring run: the cost of interposing, which batching lowers. The kick rates are bounded by the single kicking thread.\n\n"
        md += "| path | p50 µs | p99 µs | p99.9 µs | p50 / direct | p50 / epoll | kicks/s, 1 vring | kicks/s, 64 vrings | 64-vring rate / epoll | relay wakeups/s, 64 vrings | relay CPU ns/wakeup, 64 vrings | CPU / epoll |\n"
        md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        for r in rows {
            let cpu = r.sixtyFourVrings.relayCPUPerWakeup
            md += String(format: "| %@ | %.1f | %.1f | %.1f | %.2f× | %.2f× | %.0f | %.0f | %.2f× | %.0f | %@ | %@ |\n", r.path,
                         r.latency.p50, r.latency.p99, r.latency.p999, r.p50VersusDirect, r.p50VersusEpoll,
                         r.oneVring.notificationsPerSecond, r.sixtyFourVrings.notificationsPerSecond,
                         r.rate64VersusEpoll, r.sixtyFourVrings.wakeupsPerSecond,
                         cpu > 0 ? String(format: "%.1f", cpu) : "–", cpu > 0 ? String(format: "%.2f×", r.cpuPerKickVersusEpoll) : "–")
        }
        if json {
            try printJSON(["notify": rows])
        } else {
            print(md)
        }
        if let output { try md.write(toFile: output, atomically: true, encoding: .utf8) }
    }
}
