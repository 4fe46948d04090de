import ArgumentParser
import BridgeCore
import BridgeDaemon
import EmulatedGuests
import Foundation
import LinuxIO
import Logging
import VhostUser

struct DPDKBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dpdk",
        abstract: "testpmd txonly → vhost-pci-bridged → emulated VM2 (transmit), and VM2 → bridge → testpmd rxonly (receive), each versus the same testpmd pair on DPDK's vhost back end, in one run (needs dpdk-testpmd)."
    )

    enum Direction: String, ExpressibleByArgument, CaseIterable {
        /// VM1 (testpmd) transmits, VM2 receives.
        case transmit
        /// VM2 writes frames into VM1's receive buffers, VM1 (testpmd) receives.
        case receive
        /// Both at once: testpmd in flowgen (sends, and receives what comes).
        case bidirectional
        /// Each of the three in turn.
        case all
    }

    @Option(help: "transmit (VM1 → VM2), receive (VM2 → VM1), bidirectional (both at once) or all.")
    var direction: Direction = .all

    @Option(help: "Seconds per measurement.")
    var seconds: Double = 5

    @Option(help: "Comma-separated frame sizes.")
    var sizes: String = "64,1500"

    @Option(help: "Comma-separated queue-pair counts, each measured for the front end, the bridge and the testpmd pair.")
    var queues: String = "1,2"

    @Option(help: "Milliseconds the VM2 device polls after its last work before sleeping on kicks (0: kick-driven).")
    var pollMs: Int = 100

    @Flag(help: "Instead of the comparison with DPDK: each bridge run twice in this run, VM2's engine without and with dirty-page logging (as while VM1 live-migrates: every page it writes marked in a log), and the ratio.")
    var dirtyLog = false

    @Flag(help: "Print one JSON object instead of Markdown.")
    var json = false

    static let testpmd = "/usr/bin/dpdk-testpmd"

    func counter(_ log: String, _ field: String) -> Int? {
        guard let text = try? String(contentsOfFile: log, encoding: .utf8),
              let r = text.range(of: "Accumulated forward statistics"),
              let f = text[r.upperBound...].range(of: "\(field): ") else { return nil }
        return Int(text[f.upperBound...].prefix { $0.isNumber })
    }

    /// Each testpmd polls on one core and keeps its main lcore on the other,
    /// so two of them (the pair) do not time-slice one core.
    /// virtio-user's default ring size (`queue_size`), per queue.
    static let virtioUserRingSize = 256

    func frontEnd(_ socket: String, size: Int, name: String, server: Bool, mode: String, queues: Int) -> [String] {
        ["-l", "0,1", "--main-lcore", server ? "1" : "0", "--no-huge", "-m", "256", "--no-pci", "--file-prefix=\(name)",
         server ? "--vdev=net_vhost0,iface=\(socket),queues=\(queues)" : "--vdev=net_virtio_user0,path=\(socket),queues=\(queues)",
         "--", "--total-num-mbufs=16384", "--forward-mode=\(mode)", "--txpkts=\(size)", "--rxq=\(queues)", "--txq=\(queues)", "--auto-start",
         "--stats-period=1"]
    }

    /// An identity bridge with `queues` queue pairs serving VM1 at
    /// `dir`/vm1.sock and VM2 at `dir`/vm2.sock, on a thread of its own.
    func startBridge(_ name: String, dir: String, queues: Int) throws -> (Bridge, JoinableThread) {
        var logger = Logger(label: "bench")
        logger.logLevel = .critical
        let bridge = try Bridge(BridgeSettings(name: name, socketPath: "\(dir)/vm1.sock", peerSocketPath: "\(dir)/vm2.sock",
                                               backend: BackendConfiguration(bridgeName: name,
                                                                             addressSpace: AddressSpaceConfiguration(barSize: 1 << 36, mode: .identity),
                                                                             queuePairs: queues)),
                                logger: logger)
        return (bridge, try JoinableThread(name: "bench-bridge") { bridge.serve() })
    }

    /// testpmd txonly → bridge (identity) → VM2 counting frames; Mpps seen by VM2.
    func throughBridge(size: Int, queues: Int, logging: Bool = false) throws -> BridgeRun {
        let dir = "/tmp/vpb-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (bridge, server) = try startBridge("bench", dir: dir, queues: queues)
        defer { bridge.stop(); server.join() }
        var config = VM2Configuration()
        config.dataPath = .count
        config.pollFor = .milliseconds(pollMs)
        config.forcesDirtyLog = logging
        let vm2 = try EmulatedVM2(peerSocketPath: "\(dir)/vm2.sock", configuration: config)
        defer { vm2.stop() }
        let (p, stdin) = try launchChild(Self.testpmd, frontEnd("\(dir)/vm1.sock", size: size, name: "bench-tx", server: false, mode: "txonly", queues: queues), log: "\(dir)/tx.log")
        for _ in 0..<300 where vm2.statistics.framesValid == 0 { usleep(10_000) }
        let clock = ContinuousClock()
        let start = clock.now, first = vm2.statistics.packetsReceived
        usleep(UInt32(seconds * 1_000_000))
        let n = vm2.statistics.packetsReceived - first
        let mpps = Double(n) / (start.duration(to: clock.now) / .seconds(1)) / 1e6
        finishChild(p, stdin)
        // Cross-check: VM2 saw every frame testpmd says it sent, each a plausible Ethernet frame.
        for _ in 0..<100 where vm2.statistics.packetsReceived < (counter("\(dir)/tx.log", "TX-packets") ?? 0) { usleep(10_000) }
        let s = vm2.statistics
        return BridgeRun(mpps: mpps, testpmdSent: counter("\(dir)/tx.log", "TX-packets") ?? -1, vm2Received: s.packetsReceived,
                         vm2Implausible: s.framesInvalid, refused: s.descriptorsRefused, kicks: s.kicksReceived,
                         writesLogged: s.writesLogged, writesUnlogged: s.writesUnlogged)
    }

    /// VM2 generates frames into testpmd's receive buffers (rxonly,
    /// virtio-user) through the bridge (identity); Mpps VM2 delivered.
    func receiveThroughBridge(size: Int, queues: Int, logging: Bool = false) throws -> BridgeRun {
        let dir = "/tmp/vpb-bench-rx-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (bridge, server) = try startBridge("bench-rx", dir: dir, queues: queues)
        defer { bridge.stop(); server.join() }
        let vm2 = try generatingVM2(dir: dir, size: size, logging: logging)
        defer { vm2.stop() }
        let (p, stdin) = try launchChild(Self.testpmd, frontEnd("\(dir)/vm1.sock", size: size, name: "bench-rx", server: false, mode: "rxonly", queues: queues), log: "\(dir)/rx.log")
        for _ in 0..<300 where vm2.statistics.packetsSent == 0 { usleep(10_000) }
        let clock = ContinuousClock()
        let start = clock.now, first = vm2.statistics.packetsSent
        usleep(UInt32(seconds * 1_000_000))
        let n = vm2.statistics.packetsSent - first
        let mpps = Double(n) / (start.duration(to: clock.now) / .seconds(1)) / 1e6
        finishChild(p, stdin)
        let s = vm2.statistics
        return BridgeRun(mpps: mpps, testpmdSent: counter("\(dir)/rx.log", "RX-packets") ?? -1, vm2Received: s.packetsSent,
                         vm2Implausible: 0, refused: s.descriptorsRefused, kicks: s.kicksReceived,
                         writesLogged: s.writesLogged, writesUnlogged: s.writesUnlogged)
    }

    /// Both ways at once through the bridge: testpmd in flowgen (sends, and
    /// receives and drops what comes) while VM2 counts what it receives and
    /// generates into testpmd's receive buffers; Mpps is both directions
    /// together, as VM2 counted them.
    func bothWaysThroughBridge(size: Int, queues: Int) throws -> BridgeRun {
        let dir = "/tmp/vpb-bench-bidi-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (bridge, server) = try startBridge("bench-bidi", dir: dir, queues: queues)
        defer { bridge.stop(); server.join() }
        let vm2 = try generatingVM2(dir: dir, size: size)
        defer { vm2.stop() }
        let (p, stdin) = try launchChild(Self.testpmd, frontEnd("\(dir)/vm1.sock", size: size, name: "bench-bidi", server: false, mode: "flowgen", queues: queues), log: "\(dir)/bidi.log")
        for _ in 0..<300 where vm2.statistics.packetsSent == 0 || vm2.statistics.packetsReceived == 0 { usleep(10_000) }
        let clock = ContinuousClock()
        let before = vm2.statistics
        let start = clock.now
        usleep(UInt32(seconds * 1_000_000))
        let after = vm2.statistics
        let n = (after.packetsSent - before.packetsSent) + (after.packetsReceived - before.packetsReceived)
        let mpps = Double(n) / (start.duration(to: clock.now) / .seconds(1)) / 1e6
        finishChild(p, stdin)
        let s = vm2.statistics
        return BridgeRun(mpps: mpps, testpmdSent: counter("\(dir)/bidi.log", "TX-packets") ?? -1, vm2Received: s.packetsReceived,
                         vm2Implausible: s.framesInvalid, refused: s.descriptorsRefused, kicks: s.kicksReceived)
    }

    /// VM2 counting what it receives and generating `size`-byte frames into
    /// every receive buffer VM1 offers.
    func generatingVM2(dir: String, size: Int, logging: Bool = false) throws -> EmulatedVM2 {
        var config = VM2Configuration()
        config.forcesDirtyLog = logging
        config.dataPath = .count
        config.echo = false
        config.pollFor = .milliseconds(pollMs)
        config.generateFrames = Int.max
        config.frameSize = size
        return try EmulatedVM2(peerSocketPath: "\(dir)/vm2.sock", configuration: config)
    }

    struct BridgeRun: Codable {
        var mpps: Double
        var testpmdSent: Int
        var vm2Received: Int
        var vm2Implausible: Int
        var refused: Int
        var kicks: Int
        var writesLogged: UInt64 = 0
        var writesUnlogged: UInt64 = 0
    }

    /// The testpmd pair on DPDK's vhost back end; Mpps counted by the
    /// receiver. Transmit: txonly on virtio-user → rxonly on the back end;
    /// `receive`: txonly on the back end → rxonly on virtio-user.
    func pair(size: Int, queues: Int, receive: Bool = false, bothWays: Bool = false) throws -> Double {
        let dir = "/tmp/vpb-bench-pair-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sock = "\(dir)/pair.sock"
        let (server, serverIn) = try launchChild(Self.testpmd, frontEnd(sock, size: size, name: "bench-pserver", server: true,
                                                                         mode: bothWays ? "flowgen" : receive ? "txonly" : "rxonly", queues: queues), log: "\(dir)/server.log")
        for _ in 0..<300 where !FileManager.default.fileExists(atPath: sock) { usleep(10_000) }
        let (client, clientIn) = try launchChild(Self.testpmd, frontEnd(sock, size: size, name: "bench-pclient", server: false,
                                                                         mode: bothWays ? "flowgen" : receive ? "rxonly" : "txonly", queues: queues), log: "\(dir)/client.log")
        let (receiver, receiverIn, log) = receive ? (client, clientIn, "client") : (server, serverIn, "server")
        let (sender, senderIn) = receive ? (server, serverIn) : (client, clientIn)
        let clock = ContinuousClock()
        let start = clock.now
        usleep(UInt32(seconds * 1_000_000))
        finishChild(receiver, receiverIn)
        let elapsed = start.duration(to: clock.now) / .seconds(1)
        finishChild(sender, senderIn)
        // The receiver's own per-second rate once it runs (`--stats-period`):
        // the window above also holds testpmd's start-up, which the bridge's
        // runs do not count (they time from the first frame).
        if bothWays {
            // Each side's receive rate: what the other sent and it took.
            return ((steadyRate("\(dir)/server.log") ?? 0) + (steadyRate("\(dir)/client.log") ?? 0)) / 1e6
        }
        if let steady = steadyRate("\(dir)/\(log).log") { return steady / 1e6 }
        let n = counter("\(dir)/\(log).log", "RX-packets") ?? 0
        return Double(n) / elapsed / 1e6
    }

    /// The median of the non-zero `Rx-pps` testpmd printed each second,
    /// without the first (a partial second); nil when it printed none.
    func steadyRate(_ log: String) -> Double? {
        guard let text = try? String(contentsOfFile: log, encoding: .utf8) else { return nil }
        var rates: [Double] = []
        var rest = text[...]
        while let r = rest.range(of: "Rx-pps: ") {
            let digits = rest[r.upperBound...].drop { $0 == " " }.prefix { $0.isNumber }
            if let v = Double(digits), v > 0 { rates.append(v) }
            rest = rest[r.upperBound...]
        }
        guard rates.count >= 2 else { return nil }
        let steady = rates.dropFirst().sorted()
        return steady[steady.count / 2]
    }

    struct Row: Codable {
        var direction: String; var size: Int; var queues: Int; var bridgeMpps: Double; var pairMpps: Double; var ratio: Double
        var testpmdSent: Int; var vm2Received: Int; var vm2Implausible: Int; var refused: Int; var kicks: Int
    }

    func run() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.testpmd) else {
            throw ValidationError("dpdk-testpmd is not installed: apt-get install dpdk-dev (or make interop-deps)")
        }
        if dirtyLog { return try loggingCost() }
        var rows: [Row] = []
        for q in queues.split(separator: ",").compactMap({ Int($0) }) {
            for size in sizes.split(separator: ",").compactMap({ Int($0) }) {
                if direction == .transmit || direction == .all {
                    FileHandle.standardError.write(Data("dpdk: transmit, \(size) B, \(q) queue pair(s), through the bridge…\n".utf8))
                    let b = try throughBridge(size: size, queues: q)
                    FileHandle.standardError.write(Data("dpdk: transmit, \(size) B, \(q) queue pair(s), testpmd pair…\n".utf8))
                    let p = try pair(size: size, queues: q)
                    // testpmd counts a frame as sent when it puts it on its TX
                    // ring; what is still there when it quits is never handed
                    // over. Anything beyond a full ring per queue pair was lost.
                    let unconsumed = b.testpmdSent - b.vm2Received
                    guard (0...(Self.virtioUserRingSize * q)).contains(unconsumed), b.vm2Implausible == 0, b.refused == 0 else {
                        throw ValidationError("\(size) B, \(q) queue pair(s): testpmd sent \(b.testpmdSent), VM2 received \(b.vm2Received) (\(b.vm2Implausible) not Ethernet, \(b.refused) refused): more than a ring's worth is missing")
                    }
                    rows.append(Row(direction: "transmit", size: size, queues: q, bridgeMpps: b.mpps, pairMpps: p, ratio: p > 0 ? b.mpps / p : 0,
                                    testpmdSent: b.testpmdSent, vm2Received: b.vm2Received, vm2Implausible: b.vm2Implausible, refused: b.refused, kicks: b.kicks))
                }
                if direction == .receive || direction == .all {
                    FileHandle.standardError.write(Data("dpdk: receive, \(size) B, \(q) queue pair(s), through the bridge…\n".utf8))
                    let b = try receiveThroughBridge(size: size, queues: q)
                    FileHandle.standardError.write(Data("dpdk: receive, \(size) B, \(q) queue pair(s), testpmd pair…\n".utf8))
                    let p = try pair(size: size, queues: q, receive: true)
                    // Every frame VM2 published in a used ring is one testpmd
                    // received (it polls its rings until it quits).
                    guard b.testpmdSent >= 0, b.testpmdSent <= b.vm2Received, b.refused == 0 else {
                        throw ValidationError("receive, \(size) B, \(q) queue pair(s): VM2 delivered \(b.vm2Received), testpmd received \(b.testpmdSent), \(b.refused) refused")
                    }
                    rows.append(Row(direction: "receive", size: size, queues: q, bridgeMpps: b.mpps, pairMpps: p, ratio: p > 0 ? b.mpps / p : 0,
                                    testpmdSent: b.testpmdSent, vm2Received: b.vm2Received, vm2Implausible: 0, refused: b.refused, kicks: b.kicks))
                }
                if direction == .bidirectional || direction == .all {
                    FileHandle.standardError.write(Data("dpdk: both ways, \(size) B, \(q) queue pair(s), through the bridge…\n".utf8))
                    let b = try bothWaysThroughBridge(size: size, queues: q)
                    FileHandle.standardError.write(Data("dpdk: both ways, \(size) B, \(q) queue pair(s), testpmd pair…\n".utf8))
                    let p = try pair(size: size, queues: q, bothWays: true)
                    guard b.vm2Implausible == 0, b.refused == 0 else {
                        throw ValidationError("both ways, \(size) B, \(q) queue pair(s): \(b.vm2Implausible) frames not Ethernet, \(b.refused) refused")
                    }
                    rows.append(Row(direction: "both ways", size: size, queues: q, bridgeMpps: b.mpps, pairMpps: p, ratio: p > 0 ? b.mpps / p : 0,
                                    testpmdSent: b.testpmdSent, vm2Received: b.vm2Received, vm2Implausible: b.vm2Implausible, refused: b.refused, kicks: b.kicks))
                }
            }
        }
        if json {
            try printJSON(["dpdk": rows])
            return
        }
        print("### DPDK (`vhost-pci-bench dpdk`, \(seconds) s per run)\n")
        print("**Transmit** (VM1 → VM2): testpmd txonly (virtio-user) → vhost-pci-bridged (identity) → VM2 on the `DeviceEngine` (count mode: every frame's Ethernet header read in place, polling \(pollMs) ms before sleeping on kicks), versus testpmd txonly → testpmd rxonly (DPDK's own vhost back end, which copies every frame into an mbuf) on the same machine. \"testpmd sent\" and \"VM2 received\" are whole-run totals. testpmd counts a frame as sent when it puts it on its TX ring, so the frames still on the ring when it quits (at most \(Self.virtioUserRingSize) per queue pair) are counted but never handed over; the run fails if more are missing, or if VM2 found a frame that is not Ethernet or refused a descriptor. \"kicks\" is how many times testpmd kicked over the run: VM2 tells it not to while it polls.\n")
        print("**Receive** (VM2 → VM1): VM2 writes Ethernet frames straight into testpmd's receive buffers (rxonly, virtio-user, MRG_RXBUF negotiated) through the bridge, round-robin over the receive queues, versus DPDK's vhost back end in txonly feeding the same testpmd rxonly. Through the bridge the rate is what VM2 delivered (published in used rings) over the timed window; the run fails unless testpmd received no more than VM2 delivered.\n")
        print("**Both ways** at once: testpmd in flowgen (it sends, and receives and drops what comes) through the bridge while VM2 counts what it receives and fills testpmd's receive buffers, versus two testpmds in flowgen on DPDK's vhost back end. Mpps is both directions together (as VM2 counted them; for the pair, the sum of both testpmds' receive rates); the testpmd and VM2 columns are testpmd's sent and VM2's received.\n")
        print("| direction | frame | queue pairs | through the bridge, Mpps | testpmd pair, Mpps | bridge / pair | testpmd sent (tx) / received (rx) | VM2 received (tx) / delivered (rx) | not Ethernet | refused | kicks |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows {
            print(String(format: "| %@ | %d B | %d | %.3f | %.3f | %.2f× | %d | %d | %d | %d | %d |", r.direction, r.size, r.queues, r.bridgeMpps, r.pairMpps, r.ratio,
                         r.testpmdSent, r.vm2Received, r.vm2Implausible, r.refused, r.kicks))
        }
    }

    /// What dirty logging costs VM2's engine against real traffic: each
    /// bridge run without and with logging, in this run.
    func loggingCost() throws {
        struct LogRow: Codable { var direction: String; var size: Int; var queues: Int; var off: Double; var on: Double; var ratio: Double; var writesLogged: UInt64 }
        var rows: [LogRow] = []
        for q in queues.split(separator: ",").compactMap({ Int($0) }) {
            for size in sizes.split(separator: ",").compactMap({ Int($0) }) {
                for receive in [false, true] where direction == .all || direction == (receive ? .receive : .transmit) {
                    let name = receive ? "receive" : "transmit"
                    FileHandle.standardError.write(Data("dpdk: \(name), \(size) B, \(q) queue pair(s), logging off, then on…\n".utf8))
                    // Off and on alternate, three times: this machine's rate
                    // swings between runs, a pair's ratio less.
                    var pairs: [(off: Double, on: Double, logged: UInt64)] = []
                    for _ in 0..<3 {
                        let off = receive ? try receiveThroughBridge(size: size, queues: q) : try throughBridge(size: size, queues: q)
                        let on = receive ? try receiveThroughBridge(size: size, queues: q, logging: true) : try throughBridge(size: size, queues: q, logging: true)
                        guard on.writesLogged > 0, on.writesUnlogged == 0 else {
                            throw ValidationError("\(name), \(size) B: VM2 logged \(on.writesLogged) writes, \(on.writesUnlogged) not")
                        }
                        pairs.append((off.mpps, on.mpps, on.writesLogged))
                    }
                    let median = pairs.sorted { $0.on / max($0.off, 1e-9) < $1.on / max($1.off, 1e-9) }[1]
                    rows.append(LogRow(direction: name, size: size, queues: q, off: median.off, on: median.on,
                                       ratio: median.off > 0 ? median.on / median.off : 0, writesLogged: median.logged))
                }
            }
        }
        if json {
            try printJSON(["dirtyLog": rows])
            return
        }
        print("### Dirty logging (`vhost-pci-bench dpdk --dirty-log`, \(seconds) s per run)\n")
        print("The bridge runs of the table above (testpmd on virtio-user as VM1, VM2 on the `DeviceEngine`), each measured without, then with dirty-page logging (as while VM1 live-migrates: every page VM2 writes into VM1's memory — received frames, used rings — marked in a log, by guest-physical page), three times in alternation; the pair with the median ratio is shown. Transmit writes only used rings; receive writes every frame.\n")
        print("| direction | frame | queue pairs | logging off, Mpps | logging on, Mpps | on / off | writes logged |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows {
            print(String(format: "| %@ | %d B | %d | %.3f | %.3f | %.2f× | %llu |", r.direction, r.size, r.queues, r.off, r.on, r.ratio, r.writesLogged))
        }
    }
}
