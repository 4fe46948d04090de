import BridgeCore
import DeviceEngine
import LinuxIO
import PeerProtocol

/// What the emulated VM2's device does with the frames VM1 transmits.
public enum VM2DataPath: String, Sendable, CaseIterable {
    /// Verify test packets (and check real frames' Ethernet header) in place;
    /// echo valid test packets into VM1's RX buffers when `echo` is on.
    case verify
    /// Read every frame's headers in place and count it: a sink.
    case count
    /// Write every frame into VM1's RX buffers of the same queue pair.
    case forward
}

/// How the emulated VM2 behaves.
public struct VM2Configuration: Sendable {
    public var dataPath: VM2DataPath = .verify
    /// Poll the queues this long after the last work before sleeping on
    /// kicks (and tell VM1 not to kick meanwhile); zero: notification-driven.
    public var pollFor: Duration = .zero
    /// Chains per queue per pass.
    public var burst = 64
    /// The device features VM2 says it serves in HELLO (nil: say nothing, as a
    /// version-1 peer; the daemon then assumes VERSION_1 only).
    public var deviceFeatures: VirtioNetFeatures? = NetDevice.served
    /// Acknowledge MAP/UNMAP (a VM2 that never acks is disconnected at the deadline).
    public var acknowledges = true
    /// Ask the daemon for translations of unmapped buffers (ATS-like).
    public var translates = true
    /// Send every valid TX packet back into VM1's RX buffers.
    public var echo = true
    /// Send every datagram of the Linux guest's back to it, addresses
    /// swapped (`GuestDatagram.reflected`): its own checked traffic comes
    /// back, as from testpmd's 5tswap (with `echo`).
    public var reflectsGuestDatagrams = false
    /// Transmit this many Ethernet frames of `frameSize` bytes into VM1's RX
    /// buffers (to a real front end in rxonly mode), as RX buffers appear.
    public var generateFrames = 0
    public var frameSize = 64
    /// The frame generated (virtio-net header first) instead of a broadcast
    /// one of `frameSize` bytes: e.g. a datagram addressed to a real guest.
    public var generatedFrame: [UInt8]?
    /// Answer VRING_STOP with VRING_STOPPED and the index reached (peer
    /// feature `vringStopAck`); off, VM2 behaves like a version-1 peer.
    public var acknowledgesRingStops = true
    /// Negotiate `unsealedMaps`: take MAPs of unsealed VM1 memory and guard
    /// the device's accesses to them (`DeviceMemory`); off, the daemon never
    /// sends such memory.
    public var guardsUnsealedMemory = true
    /// Negotiate `sharedRevocations`: take MAP/UNMAP from the revocation
    /// channel in shared memory and ack there (off: the socket, as a
    /// version-1 peer does).
    public var sharedRevocations = true
    /// Negotiate `dirtyLog` (with `sharedRevocations`): log every write into
    /// VM1's memory while VM1 live-migrates; off, VM1 cannot migrate while
    /// this VM2 is attached.
    public var logsDirtyPages = true
    /// Log every write from the start, into a log of VM2's own covering
    /// the whole 47-bit address space (sparse: 4 GiB of address space, a
    /// page per 128 MiB of VM1 memory written) — what logging costs, in a
    /// benchmark, without a migrating VM1. Needs `dirtyLog` (the MAPs'
    /// guest-physical addresses).
    public var forcesDirtyLog = false
    public init() {}
}

/// What the emulated VM2 saw and did.
public struct VM2Statistics: Sendable, Equatable, Codable {
    public var connected = false
    public var ready = false
    public var barSize: UInt64 = 0
    public var mode = ""
    public var mapsApplied = 0
    /// MAPs that carried the unsealed flag.
    public var unsealedMapsApplied = 0
    /// SIGBUS faults the device's guard absorbed (VM1 truncated unsealed memory).
    public var faultsAbsorbed: UInt64 = 0
    public var unmapsApplied = 0
    /// Records taken from the revocation channel, and WAKEs received.
    public var channelRecords = 0
    public var wakesReceived = 0
    /// Dirty logging (VM1 live-migrates): LOGs applied, whether the device
    /// logs now, writes marked in the log and writes it could not mark.
    public var logsApplied = 0
    public var logging = false
    public var writesLogged: UInt64 = 0
    public var writesUnlogged: UInt64 = 0
    public var bytesMapped: UInt64 = 0
    public var packetsReceived = 0
    /// Frames VM1 transmitted, by queue pair (index k: transmit queue 2k+1).
    public var receivedPerQueuePair: [Int] = []
    public var bytesReceived: UInt64 = 0
    public var packetsVerified = 0
    public var packetsCorrupt = 0
    /// Frames from a real front end (not test packets) that look like Ethernet.
    public var framesValid = 0
    public var framesInvalid = 0
    public var packetsSent = 0
    public var bytesSent: UInt64 = 0
    /// Descriptors the device refused: outside the BAR, unmapped, wrong permission, malformed chains.
    public var descriptorsRefused = 0
    /// Why descriptors were refused (reason → count).
    public var refusalReasons: [String: Int] = [:]
    public var translationsRequested = 0
    public var translationsGranted = 0
    public var translationsRefused = 0
    /// Seconds the device thread spent waiting for translations it asked
    /// for (TRANSLATE sent → TRANSLATE_REPLY read): its data path stands
    /// still meanwhile.
    public var translationWaitSeconds: Double = 0
    public var notificationsSent = 0
    public var kicksReceived = 0
    public var echoesDropped = 0
    public var lastError: String?
    public var disconnectReason: String?
}

/// An emulated VM2: the vhost-pci device model and the virtio-net *device*
/// for VM1, on its own thread. It connects to the bridge's peer socket, maps
/// every MAP into its own BAR window at `barOffset`, unmaps on request, and
/// serves VM1's rings straight from the BAR: TX packets are verified in place,
/// and (optionally) written back into VM1's RX buffers.
///
/// Sendable without `@unchecked`: the device state lives on the device thread;
/// what others read is behind a `Locked` (pthread mutex).
public final class EmulatedVM2: Sendable {
    private struct Shared {
        var statistics = VM2Statistics()
        var window: BARWindow?
        var finished = false
    }

    private let shared = Locked(Shared())
    private let stopSignal: EventFD
    /// Translations asked from other threads, sent and answered by the
    /// device thread (nil: the connection ended first).
    let translations: Mailbox<PeerTranslate, PeerTranslateReply?>
    private let thread: Locked<JoinableThread?> = Locked(nil)

    /// Connects and starts the device thread.
    public init(peerSocketPath: String, configuration: VM2Configuration = VM2Configuration()) throws {
        stopSignal = try EventFD()
        translations = try Mailbox()
        let socket = try Self.connect(peerSocketPath, configuration)
        let t = try JoinableThread(name: "vm2") { [self] in
            let device = VM2DeviceThread(socket: socket, configuration: configuration, owner: self)
            device.run()
        }
        thread.withLock { $0 = t }
    }

    /// Without a thread: the caller drives the device (`DeviceClient`).
    init(driven: Void) throws {
        stopSignal = try EventFD()
        translations = try Mailbox()
    }

    /// Connects to the peer socket and sends HELLO with the features the
    /// configuration asks for.
    static func connect(_ peerSocketPath: String, _ configuration: VM2Configuration) throws -> UnixSocket {
        let socket = try UnixSocket.connect(path: peerSocketPath)
        // A daemon that refuses us (busy) may close before HELLO is written;
        // its ERROR is still readable, so the device thread reports it.
        var features: PeerFeatures = []
        if configuration.translates { features.insert(.translate) }
        if configuration.acknowledgesRingStops { features.insert(.vringStopAck) }
        if configuration.guardsUnsealedMemory { features.insert(.unsealedMaps) }
        if configuration.sharedRevocations { features.insert(.sharedRevocations) }
        if configuration.logsDirtyPages { features.insert(.dirtyLog) }
        try? socket.send(PeerCodec.encode(.hello(PeerHello(features: features, deviceFeatures: configuration.deviceFeatures))))
        return socket
    }

    public var statistics: VM2Statistics { shared.withLock { $0.statistics } }
    /// VM2's BAR as its guest would see it (nil until the daemon's HELLO reply).
    public var window: BARWindow? { shared.withLock { $0.window } }
    public var isFinished: Bool { shared.withLock { $0.finished } }

    /// Stops the device thread and closes the connection (as if VM2 were killed).
    public func stop() {
        _ = try? stopSignal.signal()
        let t = thread.withLock { t -> JoinableThread? in defer { t = nil }; return t }
        t?.join()
    }

    /// Asks the daemon for a translation from the device thread; returns the
    /// reply (nil if none came within ~20 s or the connection ended).
    public func translate(barOffset: UInt64, length: UInt64, access: Permission) -> PeerTranslateReply? {
        guard !isFinished else { return nil }
        let request = PeerTranslate(requestID: UInt64.random(in: 1...UInt64.max), barOffset: barOffset, length: length, access: access)
        return translations.call(request, deadline: .now.advanced(by: .seconds(20))) ?? nil
    }

    // Engine → owner plumbing.
    func update(_ body: (inout VM2Statistics) -> Void) { shared.withLock { body(&$0.statistics) } }
    func setWindow(_ w: BARWindow?) { shared.withLock { $0.window = w } }
    func finish(_ reason: String) {
        shared.withLock { s in
            s.finished = true
            s.statistics.connected = false
            s.statistics.ready = false
            s.statistics.disconnectReason = reason
        }
    }
    var stopFD: Int32 { stopSignal.fd.rawValue }
    var commandFD: Int32 { translations.signal.fd.rawValue }
}

/// The device thread's state. Never leaves that thread.
final class VM2DeviceThread {
    /// A queue's notification fds and whether VM1 enabled it.
    struct Notifiers {
        var kick: EventFD?
        var call: EventFD?
        var enabled = true
        var setup: PeerVring?
    }

    let socket: UnixSocket
    let configuration: VM2Configuration
    unowned let owner: EmulatedVM2
    var device = NetDevice()
    var features: PeerFeatures = []
    var notifiers: [Int: Notifiers] = [:]
    /// Queues taken out of service (a defect, ring memory never granted),
    /// kept for where they stopped.
    var parked: [Int: DeviceQueue] = [:]
    /// Frames waiting for RX buffers: (receive queue, bytes with header).
    var pendingFrames: [(Int, [UInt8])] = []
    var generated = 0
    /// The frame the generator delivers (built once per size).
    var generatorTemplate: [UInt8] = []
    var pollSet = PollSet()
    var pollSetDirty = true
    var policy: PollPolicy

    /// Verdicts of the verify path, folded into the shared statistics once
    /// per pass (a lock per packet was the device's largest cost).
    struct Counters {
        var verified = 0, corrupt = 0, framesValid = 0, framesInvalid = 0, sent = 0, bytesSent: UInt64 = 0
    }
    var counters = Counters()
    /// The engine's totals already folded.
    var folded = (tx: QueueCounters(), rx: QueueCounters(), implausible: 0)
    var foldedFaults: UInt64 = 0
    var foldedLog: (UInt64, UInt64) = (0, 0)

    /// A virtio-net header (num_buffers = 1) and a broadcast IPv4/UDP
    /// Ethernet frame of `size` bytes.
    static func frame(number: Int, size: Int) -> [UInt8] {
        var header = [UInt8](repeating: 0, count: 12)
        header[10] = 1
        var f = [UInt8](repeating: 0xff, count: 6) + [0x52, 0x54, 0x00, 0x12, 0x34, 0x56] + [0x08, 0x00]
        let payload = max(46, size - 14)
        var ip: [UInt8] = [0x45, 0, UInt8((payload >> 8) & 0xff), UInt8(payload & 0xff), 0, 0, 0, 0, 64, 17, 0, 0,
                           10, 0, 0, 2, 255, 255, 255, 255]
        ip += [0x13, 0x88, 0x13, 0x88, UInt8(((payload - 20) >> 8) & 0xff), UInt8((payload - 20) & 0xff), 0, 0]
        ip += [UInt8](repeating: UInt8(truncatingIfNeeded: number), count: payload - ip.count)
        f += ip
        return header + f
    }
    /// The revocation channel (with `sharedRevocations`): its memory and
    /// capacity, the last record applied, and the REGION fds by slot.
    var channel: (memory: ChannelMemory, capacity: UInt32)?
    var channelApplied: UInt64 = 0
    var regionSlots: [UInt32: OwnedFileDescriptor] = [:]
    var nextRequest: UInt64 = 1
    var awaiting: [UInt64: PeerTranslateReply?] = [:]
    var inFlight: [UInt64: Mailbox<PeerTranslate, PeerTranslateReply?>.Ticket] = [:]
    var stopReason: String?
    /// For a caller that drives the device (`DeviceClient`): what happened
    /// since it last looked (nil: nobody records).
    var events: [DeviceEvent]?
    /// For a caller that drives the device: the frames VM1 transmits go to
    /// it, in place, instead of to the configured data path.
    var inspector: ((Int, borrowing ChainBytes) -> Void)?

    init(socket: UnixSocket, configuration: VM2Configuration, owner: EmulatedVM2) {
        self.socket = socket
        self.configuration = configuration
        self.owner = owner
        policy = PollPolicy(spin: configuration.pollFor)
        device.burst = max(1, configuration.burst)
    }

    /// The queues with a kick fd, in poll-set order after the three control fds.
    private var kickOrder: [Int] = []

    private func rebuildPollSet() {
        kickOrder = notifiers.keys.sorted().filter { notifiers[$0]?.kick != nil }
        pollSet.watch([owner.stopFD, owner.commandFD, socket.fd.rawValue] + kickOrder.compactMap { notifiers[$0]?.kick?.fd.rawValue })
        pollSetDirty = false
    }

    func run() {
        owner.update { $0.connected = true }
        var busy = false, polling = false, revoking = false
        while stopReason == nil {
            // Before sleeping, ask for kicks again and look once more (a
            // chain may have come while kicks were off).
            if !busy, device.requestKicks(receiving: !pendingFrames.isEmpty || generated < configuration.generateFrames) { busy = true }
            if !busy, polling { polling = false }
            let kickless = hasKicklessRing
            let waited = wait(timeoutMilliseconds: busy ? 0 : kickless ? 1 : 200)
            // Revocations are work too: a polling engine keeps polling
            // after one, so the next finds it awake (no WAKE, no sleep).
            if waited.revocations > 0, configuration.pollFor > .zero {
                policy.noteWork()
                revoking = true
            }
            guard waited.polled, !waited.changed, stopReason == nil else { continue }
            let (worked, more) = serve()
            if worked {
                policy.noteWork()
                if configuration.pollFor > .zero, !polling { device.suppressKicks(); polling = true }
            }
            busy = more || worked || ((polling || revoking) && policy.keepPolling(now: .now))
            if !busy { revoking = false }
        }
        tearDown()
    }

    /// A running ring VM1 does not kick (it polls): nobody waits for a kick on it.
    var hasKicklessRing: Bool { notifiers.values.contains { $0.enabled && $0.kick == nil } }

    /// What one `wait` saw.
    struct Waited {
        /// Poll worked (false: interrupted or failed; look again).
        var polled = false
        /// Channel records applied.
        var revocations = 0
        /// Kicks read.
        var kicks = 0
        /// The control traffic changed the queues or their fds.
        var changed = false
    }

    /// Sleeps in poll at most `timeout` ms on the stop signal, the command
    /// mailbox, the daemon's socket and the kick fds, then handles what
    /// came: control messages, channel records, kicks (read and counted).
    func wait(timeoutMilliseconds timeout: Int32) -> Waited {
        var w = Waited()
        if pollSetDirty { rebuildPollSet() }
        var timeout = timeout
        // Before sleeping: tell the daemon (it sends WAKE after posting),
        // then look at the channel once more.
        if timeout != 0, !announceSleep() { timeout = 0 }
        let polled = try? pollSet.wait(timeoutMilliseconds: timeout)
        if timeout != 0 { endSleep() }
        w.revocations = drainChannel()
        guard let n = polled else { return w }
        w.polled = true
        guard n > 0 else { return w }
        if pollSet.isReady(0) { stopReason = "stopped"; return w }
        if pollSet.isReady(1) { runCommands() }
        if pollSet.isReady(2) { readControl() }
        for (k, queue) in kickOrder.enumerated() where pollSet.isReady(3 + k) {
            _ = try? notifiers[queue]?.kick?.read()
            w.kicks += 1
        }
        if w.kicks > 0 { let kicks = w.kicks; owner.update { $0.kicksReceived += kicks } }
        w.changed = pollSetDirty
        return w
    }

    /// The connection is over: every fd closed, the BAR released, waiting
    /// translations answered with nil.
    func tearDown() {
        try? socket.fd.close()
        channel = nil
        regionSlots = [:]
        for n in notifiers.values { try? n.kick?.fd.close(); try? n.call?.fd.close() }
        notifiers = [:]
        device.removeAllQueues()
        parked = [:]
        device.memory.detach()
        owner.setWindow(nil)
        owner.finish(stopReason ?? "stopped")
        // Nobody will answer these now, nor any later request.
        owner.translations.close(answering: nil)
    }
}
