import BridgeCore
import DeviceEngine
import LinuxIO
import PeerProtocol

/// What happened to the device since its caller last looked.
public enum DeviceEvent: Sendable, Equatable {
    /// VM1 started the device with these virtio-net features.
    case deviceStarted(features: UInt64)
    /// VM1 stopped or reset the device: every ring stopped before this.
    case deviceStopped
    /// Queue `index` runs (2k: VM1's receive queue k, 2k+1: its transmit queue k).
    case ringStarted(Int)
    /// Queue `index` stopped (VRING_STOP, or VM1 disabled it).
    case ringStopped(Int)
    /// VM1 took `[barOffset, barOffset + length)` back: the device refuses
    /// it from now on (already done when the event is seen).
    case revoked(barOffset: UInt64, length: UInt64)
}

/// Why a `DeviceClient` call failed.
public enum DeviceClientError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The peer socket could not be reached.
    case connect(String)
    /// The daemon refused this VM2 (an ERROR, e.g. busy or a feature missing).
    case refused(String)
    /// No HELLO reply within the time allowed.
    case timedOut
    /// The connection is over (the daemon closed it, or `close` was called).
    case closed(String)
    /// An argument the caller gave is out of range.
    case invalid(String)

    public var description: String {
        switch self {
        case .connect(let why): "cannot connect to the peer socket: \(why)"
        case .refused(let why): "the daemon refused this VM2: \(why)"
        case .timedOut: "no HELLO reply from the daemon in time"
        case .closed(let why): "the connection is over: \(why)"
        case .invalid(let why): "invalid argument: \(why)"
        }
    }
}

/// VM2's virtio-net device on the peer protocol, driven by its caller: each
/// call runs on the caller's thread and returns (no thread of its own) —
/// the core of `libvhost-pci-device`. The same code as the emulated VM2's
/// device thread: MAP/UNMAP (socket and revocation channel), VRING,
/// VRING_STOP, DEVICE, LOG, translations of what is not granted yet, and
/// the `DeviceEngine`'s checked bursts.
///
/// Revocations take effect at the start of every call (the channel is
/// read first), so what a `receive` handed out is never valid past the
/// next call. One thread at a time; not `Sendable`.
public final class DeviceClient {
    private let owner: EmulatedVM2
    private let device: VM2DeviceThread
    private var closedReason: String?
    /// A frame with its virtio-net header, for `transmit`.
    /// (Allocated at first use: an init that fails leaves nothing behind.)
    private var scratch = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    /// Receive queues a `transmit` found full: kicks are asked on them (VM1
    /// says when it posts buffers) until a `transmit` gets through.
    private var waitingForRoom: Set<Int> = []

    /// Connects to a bridge's peer socket, says HELLO with `deviceFeatures`
    /// (what this device serves of virtio-net) and waits for the reply.
    public init(peerSocketPath: String, deviceFeatures: VirtioNetFeatures = NetDevice.served, burst: Int = 64,
                logsDirtyPages: Bool = true, within timeout: Duration = .seconds(5)) throws(DeviceClientError) {
        var configuration = VM2Configuration()
        configuration.dataPath = .count
        configuration.echo = false
        configuration.burst = max(1, min(burst, 4096))
        configuration.deviceFeatures = deviceFeatures
        configuration.logsDirtyPages = logsDirtyPages
        do {
            owner = try EmulatedVM2(driven: ())
        } catch {
            throw .connect("\(error)")
        }
        let socket: UnixSocket
        do {
            socket = try EmulatedVM2.connect(peerSocketPath, configuration)
        } catch {
            throw .connect("\(error)")
        }
        device = VM2DeviceThread(socket: socket, configuration: configuration, owner: owner)
        device.events = []
        owner.update { $0.connected = true }
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while !owner.statistics.ready {
            if let why = device.stopReason {
                closedReason = why // deinit does not tear down again
                device.tearDown()
                throw why.hasPrefix("daemon error") ? .refused(why) : .closed(why)
            }
            guard ContinuousClock.now < deadline else {
                device.stopReason = "no HELLO reply"
                closedReason = "no HELLO reply"
                device.tearDown()
                throw .timedOut
            }
            _ = device.wait(timeoutMilliseconds: 50)
        }
    }

    deinit {
        close()
        if scratch.baseAddress != nil { scratch.deallocate() }
    }

    /// Ends the connection: every mapping and fd released. Idempotent.
    public func close() {
        guard closedReason == nil else { return }
        closedReason = "closed"
        if device.stopReason == nil { device.stopReason = "closed by the application" }
        device.tearDown()
    }

    /// Why the connection ended (nil while it is up).
    public var endReason: String? { closedReason == nil ? device.stopReason : (device.stopReason ?? closedReason) }

    /// The BAR's size, the counters, and what the device refused.
    public var statistics: VM2Statistics { owner.statistics }

    /// The events since the last call, oldest first.
    public func takeEvents() -> [DeviceEvent] {
        defer { device.events = [] }
        return device.events ?? []
    }

    private func checkOpen() throws(DeviceClientError) {
        if let reason = device.stopReason {
            if closedReason == nil {
                closedReason = reason
                device.tearDown()
            }
            throw .closed(reason)
        }
        if let closedReason { throw .closed(closedReason) }
    }

    /// Waits at most `timeoutMilliseconds` (0: only looks) for the daemon,
    /// a kick or a chain, and handles what came: MAP, UNMAP, ring and device
    /// changes (`takeEvents`). Returns whether frames or room may be waiting
    /// (call `receive`/`transmit`); throws once the connection is over.
    public func poll(timeoutMilliseconds: Int32) throws(DeviceClientError) -> Bool {
        try checkOpen()
        device.drainChannel() // revocations first
        var timeout = max(0, timeoutMilliseconds)
        // Ask for kicks before sleeping, and look once more: a chain may
        // have come while they were off. Receive queues only when a
        // transmit found one full (else VM1 would kick at every refill).
        let waiting = device.device.requestKicks(receiving: !waitingForRoom.isEmpty)
        if waiting { timeout = 0 }
        if device.hasKicklessRing { timeout = min(timeout, 1) }
        let w = device.wait(timeoutMilliseconds: timeout)
        try checkOpen()
        return waiting || w.kicks > 0 || w.changed
    }

    /// One burst over every transmit queue VM1 runs: `body` sees each frame
    /// in place — its queue pair and its bytes, virtio-net header included —
    /// valid only during the call. Returns how many frames it saw.
    public func receive(_ body: (_ queuePair: Int, _ frame: borrowing ChainBytes) -> Void) throws(DeviceClientError) -> Int {
        try checkOpen()
        device.drainChannel()
        var seen = 0
        withoutActuallyEscaping(body) { body in
            device.inspector = { queue, frame in
                seen += 1
                body(queue / 2, frame)
            }
            defer { device.inspector = nil }
            _ = device.serve()
        }
        try checkOpen()
        return seen
    }

    /// Copies `count` Ethernet frames (`frame(i)`, no virtio-net header)
    /// into VM1's receive buffers of `queuePair`, in order, and publishes
    /// them once; stops at the first that does not fit (no room: try again
    /// later) and skips one too large for VM1's buffers. Returns how many
    /// were taken (written or skipped as too large).
    public func transmit(_ count: Int, queuePair: Int, frame: (Int) -> UnsafeRawBufferPointer) throws(DeviceClientError) -> Int {
        try checkOpen()
        guard queuePair >= 0, queuePair < 1 << 15 else { throw .invalid("queue pair \(queuePair)") }
        device.drainChannel()
        let rx = queuePair * 2
        var taken = 0
        var calls = false
        // Twice at most: a fault is translated once, then tried again.
        for _ in 0..<2 where taken < count && device.stopReason == nil {
            let header = VirtioNetHeader.size
            guard let (n, stop, call) = device.device.deliver(count - taken, to: rx, frame: { i in
                let f = frame(taken + i)
                if scratch.count < header + f.count {
                    if scratch.baseAddress != nil { scratch.deallocate() }
                    scratch = .allocate(byteCount: max(2048, header + f.count), alignment: 16)
                }
                let s = scratch
                for k in 0..<header { s[k] = 0 }
                if f.count > 0, let to = s.baseAddress, let from = f.baseAddress { (to + header).copyMemory(from: from, byteCount: f.count) }
                return UnsafeRawBufferPointer(rebasing: s[..<(header + f.count)])
            }) else { break }
            var bytes: UInt64 = 0
            for i in taken..<(taken + n) { bytes += UInt64(frame(i).count) }
            device.counters.sent += n
            device.counters.bytesSent += bytes
            taken += n
            calls = calls || call
            switch stop {
            case nil, .noRoom?, .delivered?: break
            case .tooLarge?:
                taken += 1
                owner.update { $0.echoesDropped += 1 }
                continue
            case .stopped(let reason)?:
                device.resolve(rx, reason)
                continue
            }
            break
        }
        if taken < count { waitingForRoom.insert(rx) } else { waitingForRoom.remove(rx) }
        if calls { device.signal([rx]) }
        device.foldCounters()
        try checkOpen()
        return taken
    }

    /// Copies `buffer.count` bytes at BAR offset `barOffset` out of VM1's
    /// memory when they are granted for reading (revocations applied
    /// first); the fault otherwise, and nothing is copied.
    public func read(barOffset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(DeviceClientError) -> AccessFault? {
        try checkOpen()
        device.drainChannel()
        return device.device.memory.burst { $0.copy(from: barOffset, into: buffer) } ?? .outside(address: barOffset, length: UInt64(buffer.count))
    }
}
