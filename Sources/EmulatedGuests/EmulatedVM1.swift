import BridgeCore
import LinuxIO
import VhostUser

/// How the emulated VM1 is built.
public struct VM1Configuration: Sendable {
    public enum IOMMUMode: String, Sendable { case none, iommu }
    public var ramSize: UInt64 = 256 << 20
    public var iommu: IOMMUMode = .none
    public var queueSize: UInt16 = 256
    /// Where the IOMMU driver allocates IOVAs (the bridge's DMA window, or any window inside the BAR).
    public var dmaWindow = BusWindow(base: BusAddress(1 << 32), limit: 1 << 36)!
    /// Send IOTLB updates for buffers as they are mapped (QEMU sends them only
    /// on misses; eager updates model a front end that sends them unsolicited).
    public var eagerBufferMaps = true
    /// Largest packet, which sizes the buffer slots.
    public var maxPacket: UInt32 = 65536
    public var protocolFeatures: ProtocolFeatures = [.mq, .logShmfd, .replyAck, .backendReq, .configureMemSlots]
    /// Seal the RAM memfd's size (QEMU's memory-backend-memfd seal=on).
    public var sealedRAM = true
    /// Back the RAM with huge pages (MFD_HUGETLB; `ramSize` a multiple of 2 MiB).
    public var hugePageRAM = false
    public init() {}
}

public enum VM1Error: Error, CustomStringConvertible {
    case ringFull(queue: Int)
    case outOfBuffers
    case packetTooLarge(Int, maximum: UInt32)
    public var description: String {
        switch self {
        case .ringFull(let q): "queue \(q) is full"
        case .outOfBuffers: "no free packet buffer in guest RAM"
        case .packetTooLarge(let n, let max): "packet of \(n) bytes exceeds \(max)"
        }
    }
}

/// An emulated VM1: guest RAM in a memfd, a virtio-net driver with an RX
/// (queue 0) and a TX (queue 1) split virtqueue, optionally a vIOMMU, and a
/// vhost-user front end that drives the back end the way QEMU does.
public final class EmulatedVM1 {
    public static let netHeaderSize = 12
    public let configuration: VM1Configuration
    public let ram: GuestRAM
    public let frontend: VhostUserFrontend
    public private(set) var iommu: EmulatedIOMMU?
    public private(set) var queues: [SplitVirtqueueDriver] = []
    public private(set) var ackedFeatures: UInt64 = 0
    /// Ring areas' bus addresses (GPA or IOVA), per queue.
    public private(set) var ringBus: [BusAddress] = []
    private var freeSlots: [UInt64]
    private let slotSize: UInt64
    private static let ringAreaGPA: UInt64 = 0x10_0000
    private static let buffersGPA: UInt64 = 16 << 20
    /// In-flight buffers per (queue, head): slot GPA and bus address.
    private var inFlight: [Int: [UInt16: (slot: UInt64, bus: BusAddress)]] = [0: [:], 1: [:]]

    public init(socketPath: String, configuration: VM1Configuration = VM1Configuration()) throws {
        self.configuration = configuration
        ram = try GuestRAM(size: configuration.ramSize, sealed: configuration.sealedRAM, hugePages: configuration.hugePageRAM)
        frontend = try VhostUserFrontend(connectingTo: socketPath)
        slotSize = (UInt64(configuration.maxPacket) + UInt64(Self.netHeaderSize) + 4095) / 4096 * 4096
        var slots: [UInt64] = []
        var at = Self.buffersGPA
        while at + slotSize <= configuration.ramSize { slots.append(at); at += slotSize }
        freeSlots = slots.reversed()
    }

    public var usesIOMMU: Bool { configuration.iommu == .iommu }

    /// Negotiates and starts the device the way QEMU 7.x does (see
    /// docs/vhost-user.md for the sequence).
    public func start() throws {
        let f = frontend
        let offered = try f.getU64(.getFeatures)
        if offered & FeatureBit.protocolFeatures != 0 {
            let theirs = ProtocolFeatures(rawValue: try f.getU64(.getProtocolFeatures))
            try f.setProtocolFeatures(configuration.protocolFeatures.intersection(theirs))
            if f.protocolFeatures.contains(.mq) { _ = try f.getU64(.getQueueNum) }
            if f.protocolFeatures.contains(.configureMemSlots) { _ = try f.getU64(.getMaxMemSlots) }
            if f.protocolFeatures.contains(.backendReq) { try f.setUpBackendChannel() }
        }
        try f.send(.setOwner)
        _ = try f.getU64(.getFeatures)
        for i in 0..<2 {
            let q = try SplitVirtqueueDriver(index: i, size: configuration.queueSize, ram: ram,
                                             ringGPA: GuestPhysicalAddress(Self.ringAreaGPA + UInt64(i) * 0x10_0000))
            queues.append(q)
            try f.send(.setVringCall(VringFileRef(index: UInt8(i), noFD: false)), fds: [q.call.fd.rawValue])
        }

        // Device start.
        var wanted = FeatureBit.version1 | (offered & FeatureBit.protocolFeatures)
        if usesIOMMU { wanted |= FeatureBit.iommuPlatform }
        ackedFeatures = wanted & offered
        try f.send(.setFeatures(ackedFeatures))
        try f.send(.setMemTable([ram.region]), fds: [ram.memfd.fd.rawValue], ack: true)
        if usesIOMMU {
            let iommu = EmulatedIOMMU(ram: ram, frontend: f, window: configuration.dmaWindow)
            self.iommu = iommu
            // Weak: the IOMMU holds the front end; a strong capture would be a cycle
            // keeping guest RAM (and its memfd) alive after the VM is gone.
            f.onMiss = { [weak iommu] in try iommu?.answer($0) }
        }
        for q in queues {
            let bus: BusAddress
            if let iommu {
                // The driver maps its rings (coherent, read/write); QEMU learns
                // about them through misses.
                bus = try iommu.map(q.ringGPA, length: q.ringBytes, permission: .readWrite, eager: false)
            } else {
                bus = BusAddress(q.ringGPA.rawValue)
            }
            ringBus.append(bus)
            let i = UInt32(q.index)
            // Without IOMMU_PLATFORM ring addresses are the VMM's user addresses.
            func ringAddress(_ gpa: GuestPhysicalAddress) -> UInt64 {
                usesIOMMU ? bus.rawValue + (gpa.rawValue - q.ringGPA.rawValue) : ram.userAddress(of: gpa).rawValue
            }
            try f.send(.setVringNum(VringState(index: i, num: UInt32(q.size))))
            try f.send(.setVringBase(VringState(index: i, num: 0)))
            try f.send(.setVringAddr(VringAddress(index: i, descriptor: ringAddress(q.descGPA), used: ringAddress(q.usedGPA),
                                                  available: ringAddress(q.availGPA))))
            try f.send(.setVringKick(VringFileRef(index: UInt8(i), noFD: false)), fds: [q.kick.fd.rawValue])
            try f.send(.setVringCall(VringFileRef(index: UInt8(i), noFD: false)), fds: [q.call.fd.rawValue])
        }
        if let iommu {
            // QEMU's vhost_dev_start sends an update for each used ring.
            for q in queues {
                try iommu.answer(IOTLBMessage(iova: ringBus[q.index].rawValue + (q.usedGPA.rawValue - q.ringGPA.rawValue),
                                              size: 0, userAddress: 0, permission: .readWrite, type: .miss))
            }
        }
        for q in queues where ackedFeatures & FeatureBit.protocolFeatures != 0 {
            try f.send(.setVringEnable(VringState(index: UInt32(q.index), num: 1)), ack: true)
        }
        try settle()
    }

    /// Makes sure the back end has processed everything sent so far and every
    /// miss it raised has been answered.
    public func settle() throws {
        var answered = -1
        while answered != (iommu?.missesAnswered ?? 0) + (iommu?.missesIgnored ?? 0) {
            answered = (iommu?.missesAnswered ?? 0) + (iommu?.missesIgnored ?? 0)
            _ = try frontend.getU64(.getFeatures) // a reply: the back end is past every earlier message
            try frontend.serviceBackendChannel()
        }
    }

    private func takeSlot() throws -> UInt64 {
        guard let slot = freeSlots.popLast() else { throw VM1Error.outOfBuffers }
        return slot
    }

    /// The bus address of a buffer slot, mapping it through the IOMMU if any.
    private func busAddress(ofSlot slot: UInt64, permission: Permission) throws -> BusAddress {
        if let iommu {
            return try iommu.map(GuestPhysicalAddress(slot), length: slotSize, permission: permission,
                                 eager: configuration.eagerBufferMaps)
        }
        return BusAddress(slot)
    }

    /// Puts one packet (virtio-net header + `payload`) on the TX queue and
    /// kicks. Returns the bus address the device will read it at.
    @discardableResult
    public func send(_ payload: [UInt8]) throws -> BusAddress {
        guard payload.count <= Int(configuration.maxPacket) else {
            throw VM1Error.packetTooLarge(payload.count, maximum: configuration.maxPacket)
        }
        let slot = try takeSlot()
        _ = ram.write(Array(repeating: 0, count: Self.netHeaderSize) + payload, at: GuestPhysicalAddress(slot))
        let bus = try busAddress(ofSlot: slot, permission: .read)
        let tx = queues[1]
        guard let head = tx.add([.init(address: bus.rawValue, length: UInt32(Self.netHeaderSize + payload.count), deviceWritable: false)]) else {
            freeSlots.append(slot)
            throw VM1Error.ringFull(queue: 1)
        }
        inFlight[1, default: [:]][head] = (slot, bus)
        try tx.kick.signal()
        return bus
    }

    /// Posts `count` receive buffers on the RX queue.
    public func postReceiveBuffers(_ count: Int) throws {
        let rx = queues[0]
        for _ in 0..<count {
            let slot = try takeSlot()
            let bus = try busAddress(ofSlot: slot, permission: .write)
            guard let head = rx.add([.init(address: bus.rawValue, length: UInt32(slotSize), deviceWritable: true)]) else {
                freeSlots.append(slot)
                throw VM1Error.ringFull(queue: 0)
            }
            inFlight[0, default: [:]][head] = (slot, bus)
        }
        try rx.kick.signal()
    }

    /// Collects used buffers of `queue`, unmapping them from the IOMMU, and
    /// returns (GPA of the buffer, bytes the device wrote).
    public func reclaim(queue: Int) throws -> [(gpa: GuestPhysicalAddress, length: UInt32)] {
        var out: [(GuestPhysicalAddress, UInt32)] = []
        for (head, length) in queues[queue].collectUsed() {
            guard let entry = inFlight[queue]?.removeValue(forKey: head) else { continue }
            if let iommu { try iommu.unmap(entry.bus) }
            freeSlots.append(entry.slot)
            out.append((GuestPhysicalAddress(entry.slot), length))
        }
        return out
    }

    /// Buffers posted on `queue` and not yet used by the device.
    public func inFlightCount(queue: Int) -> Int { inFlight[queue]?.count ?? 0 }

    /// Stops the device like QEMU (GET_VRING_BASE per queue) and returns the bases.
    public func stopDevice() throws -> [UInt32] {
        var bases: [UInt32] = []
        for q in queues {
            let payload = try frontend.send(.getVringBase(VringState(index: UInt32(q.index), num: 0))) ?? []
            bases.append(try VhostUserCodec.decodeVringStateReply(payload, to: .getVringBase).num)
        }
        return bases
    }

    /// Starts dirty-page logging the way QEMU does at the start of a live
    /// migration: SET_LOG_BASE with `log`, SET_FEATURES with
    /// VHOST_F_LOG_ALL (acked: the back end logs from then on), then
    /// SET_VRING_ADDR with VHOST_VRING_F_LOG for each ring.
    public func startLogging(_ log: VM1DirtyLog) throws {
        try frontend.send(.setLogBase(LogArea(size: log.size, offset: 0)), fds: [log.memfd.fd.rawValue])
        ackedFeatures |= FeatureBit.vhostLogAll
        try frontend.send(.setFeatures(ackedFeatures), ack: true)
        try sendRingAddresses(logging: true)
    }

    /// Stops it (QEMU at the end of a migration that failed or was cancelled).
    public func stopLogging() throws {
        ackedFeatures &= ~FeatureBit.vhostLogAll
        try frontend.send(.setFeatures(ackedFeatures), ack: true)
        try sendRingAddresses(logging: false)
    }

    /// Starts the rings again after `stopDevice`, at `bases` (what
    /// GET_VRING_BASE returned), the way QEMU's device start does during a
    /// migration: SET_FEATURES with VHOST_F_LOG_ALL first, the rings (their
    /// used rings logged), and only then `log` (SET_LOG_BASE).
    public func restartDuringMigration(at bases: [UInt32], log: VM1DirtyLog?) throws {
        ackedFeatures |= FeatureBit.vhostLogAll
        try frontend.send(.setFeatures(ackedFeatures), ack: true)
        for q in queues {
            let i = UInt32(q.index)
            try frontend.send(.setVringNum(VringState(index: i, num: UInt32(q.size))))
            try frontend.send(.setVringBase(VringState(index: i, num: q.index < bases.count ? bases[q.index] : 0)))
        }
        try sendRingAddresses(logging: true)
        for q in queues {
            try frontend.send(.setVringKick(VringFileRef(index: UInt8(q.index), noFD: false)), fds: [q.kick.fd.rawValue], ack: true)
        }
        try settle()
        if let log { try frontend.send(.setLogBase(LogArea(size: log.size, offset: 0)), fds: [log.memfd.fd.rawValue]) }
    }

    private func sendRingAddresses(logging: Bool) throws {
        for q in queues {
            let bus = ringBus[q.index]
            func ringAddress(_ gpa: GuestPhysicalAddress) -> UInt64 {
                usesIOMMU ? bus.rawValue + (gpa.rawValue - q.ringGPA.rawValue) : ram.userAddress(of: gpa).rawValue
            }
            // The used ring's log address: its GPA, or with a vIOMMU its IOVA (QEMU's used_phys).
            let log = usesIOMMU ? ringAddress(q.usedGPA) : q.usedGPA.rawValue
            try frontend.send(.setVringAddr(VringAddress(index: UInt32(q.index), flags: logging ? VringAddress.flagLog : 0,
                                                         descriptor: ringAddress(q.descGPA), used: ringAddress(q.usedGPA),
                                                         available: ringAddress(q.availGPA), log: logging ? log : 0)), ack: true)
        }
    }

    /// Drops the connection (as a killed VMM would).
    public func disconnect() {
        frontend.close()
    }
}

/// VM1's dirty log as QEMU makes it: a memfd sealed against shrinking and
/// growing, one bit per 4 KiB page of its RAM, mapped here to read it back.
public final class VM1DirtyLog {
    public let memfd: Memfd
    public let size: UInt64
    private let memory: DirtyLogMemory

    /// A log for `ramSize` bytes of guest-physical memory (`size` overrides
    /// it: a log too small, for tests).
    public init(ramSize: UInt64, size: UInt64? = nil) throws {
        let bytes = size ?? DirtyLog.bytesNeeded(toCover: ramSize)
        memfd = try Memfd(name: "vhost-log", size: bytes)
        try memfd.addSeals([.shrink, .grow, .seal])
        self.size = bytes
        memory = try DirtyLogMemory(adopting: memfd.fd, size: bytes, offset: 0)
    }

    deinit { try? memfd.fd.close() }

    public func isMarked(page: UInt64) -> Bool { memory.isMarked(page: page) }

    /// Every page marked.
    public var markedPages: Set<UInt64> {
        Set((0..<size * 8).filter { memory.isMarked(page: $0) })
    }
}

/// The outcome of a traffic run.
public struct TrafficResult: Sendable, Equatable, Codable {
    public var sent = 0
    public var bytesSent: UInt64 = 0
    public var received = 0
    public var bytesReceived: UInt64 = 0
    public var verified = 0
    public var corrupt = 0
    public var seconds: Double = 0
    public var completed = false
}

extension EmulatedVM1 {
    /// Sends `count` test packets with sizes cycling through `sizes`, keeps RX
    /// buffers posted, and collects VM2's echoes until all `count` came back
    /// verified, nothing moved for `idleLimit` polls of 100 ms, or `stop`
    /// says so. `progress` is called about every 1000 packets.
    /// `written`: each RX buffer VM2 filled (its GPA and the bytes written).
    public func runTraffic(count: Int, sizes: [Int], expectEcho: Bool = true, idleLimit: Int = 50,
                           stop: () -> Bool = { false }, written: (GuestPhysicalAddress, UInt32) -> Void = { _, _ in },
                           progress: (TrafficResult) -> Void = { _ in }) throws -> TrafficResult {
        let clock = ContinuousClock()
        let start = clock.now
        var result = TrafficResult()
        let window = max(1, Int(configuration.queueSize) / 2)
        var idle = 0
        var lastReport = 0
        let sizes = sizes.isEmpty ? [64] : sizes
        var inFlight: Int { inFlightCount(queue: 1) }
        while (expectEcho ? result.received < count : (result.sent < count || inFlight > 0)), idle < idleLimit, !stop() {
            var moved = false
            // Keep the RX ring stocked.
            let posted = inFlightCount(queue: 0)
            if expectEcho, posted < window {
                try postReceiveBuffers(window - posted)
            }
            // Fill the TX window.
            while result.sent < count, inFlight < window {
                let size = max(TestPacket.minimumSize, sizes[result.sent % sizes.count])
                try send(TestPacket.make(sequence: UInt32(truncatingIfNeeded: result.sent), size: size))
                result.sent += 1
                result.bytesSent += UInt64(size)
                moved = true
            }
            try settleMisses()
            if !(try reclaim(queue: 1)).isEmpty { moved = true }
            for (gpa, length) in try reclaim(queue: 0) {
                written(gpa, length)
                moved = true
                result.received += 1
                let n = Int(length) - Self.netHeaderSize
                guard n >= 0, let bytes = ram.read(n, at: GuestPhysicalAddress(gpa.rawValue + UInt64(Self.netHeaderSize))) else {
                    result.corrupt += 1
                    continue
                }
                result.bytesReceived += UInt64(n)
                if case .valid = TestPacket.verify(bytes) { result.verified += 1 } else { result.corrupt += 1 }
            }
            if result.sent - lastReport >= 1000 {
                lastReport = result.sent
                result.seconds = start.duration(to: clock.now) / .seconds(1)
                progress(result)
            }
            if moved {
                idle = 0
            } else {
                idle += 1
                var fds = [queues[0].call.fd.rawValue, queues[1].call.fd.rawValue]
                if let channel = frontend.backendChannel { fds.append(channel.fd.rawValue) }
                if let ready = try? Poll.readable(fds, timeoutMilliseconds: 100) {
                    if ready[0] { _ = try queues[0].call.read() }
                    if ready[1] { _ = try queues[1].call.read() }
                }
            }
        }
        result.completed = expectEcho ? result.verified == count : result.sent == count && inFlight == 0
        result.seconds = start.duration(to: clock.now) / .seconds(1)
        progress(result)
        return result
    }

    /// Answers IOTLB misses that are waiting on the back-end channel.
    public func settleMisses() throws {
        try frontend.serviceBackendChannel()
    }
}
