import BridgeCore

/// A virtio-net device served from VM2's BAR: the queues VM1 set up, the
/// memory they live in, and one `pass` that serves every queue in bursts.
/// The reference data plane for a VM2: the emulated VM2 and the benchmarks
/// run on it. Not thread-safe: one device thread owns it.
///
/// Queue numbering is virtio-net's: 2k receives (the device writes VM1's RX
/// buffers), 2k+1 transmits (the device reads VM1's TX buffers).
public struct NetDevice {
    public enum Mode: Sendable, Equatable {
        /// Read every frame in place (the Ethernet header is checked) and complete it.
        case count
        /// Write every frame VM1 transmits on queue 2k+1 into its RX buffers on
        /// queue 2k (dropped when there is no room), like a loopback cable.
        case forward
        /// Hand every frame to the caller's closure.
        case inspect
    }

    public var memory = DeviceMemory()
    /// What VM1 negotiated (DEVICE start).
    public private(set) var features: VirtioNetFeatures = []
    private var queues: [DeviceQueue?] = []
    public private(set) var counters: [QueueCounters] = []
    /// Frames in `count` mode whose Ethernet header looked wrong.
    public private(set) var implausibleFrames = 0
    private var txScratch = Segments()
    private var rxScratch = Segments()
    /// Chains per queue per pass (and per published used index).
    public var burst = 64

    public init() {}

    /// What this engine serves: split rings, VERSION_1, EVENT_IDX, MRG_RXBUF
    /// and any number of queue pairs.
    public static let served: VirtioNetFeatures = [.version1, .eventIdx, .mrgRxbuf, .mq]

    public var mergeable: Bool { features.contains(.mrgRxbuf) }

    /// DEVICE start: the features VM1 negotiated (EVENT_IDX and MRG_RXBUF
    /// change how queues set up after this are served).
    public mutating func start(features: UInt64) { self.features = VirtioNetFeatures(rawValue: features) }

    /// Sets queue `index` up (VRING); returns why it cannot be served, if so.
    @discardableResult
    public mutating func setQueue(_ index: Int, ring: SplitRing, start: UInt16, usedIndex: UInt16? = nil) -> String? {
        guard index >= 0, index < 1 << 16 else { return "queue index \(index) is out of range" }
        while queues.count <= index { queues.append(nil); counters.append(QueueCounters()) }
        let q = DeviceQueue(index: index, ring: ring, start: start, usedIndex: usedIndex, eventIndex: features.contains(.eventIdx))
        queues[index] = q
        return q.defect
    }

    public func queue(_ index: Int) -> DeviceQueue? { index >= 0 && index < queues.count ? queues[index] : nil }

    /// VRING_STOP: the queue as it stood (its `lastAvail` is where VM2 stopped).
    @discardableResult
    public mutating func removeQueue(_ index: Int) -> DeviceQueue? {
        guard index >= 0, index < queues.count, let q = queues[index] else { return nil }
        queues[index] = nil
        return q
    }

    public mutating func removeAllQueues() {
        for i in queues.indices { queues[i] = nil }
    }

    /// After a translation for the chain a queue stopped on was refused.
    public mutating func refuseNextFault(on index: Int) {
        guard index >= 0, index < queues.count else { return }
        queues[index]?.refuseNextFault = true
    }

    /// What one pass did.
    public struct Pass: Sendable, Equatable {
        /// Chains completed (all queues), refused ones included.
        public var chains = 0
        /// A queue still had chains when its burst ended.
        public var more = false
        /// Queues whose driver asked to be called.
        public var calls: [Int] = []
        /// Queues that stopped on a fault (translate, then pass again) or a defect.
        public var stops: [Stop] = []
        public struct Stop: Sendable, Equatable {
            public var queue: Int
            public var reason: QueueStop
            public init(queue: Int, reason: QueueStop) { self.queue = queue; self.reason = reason }
        }
    }

    /// Serves every transmit queue once, for up to `burst` chains each;
    /// nil before the BAR exists. `inspect` sees each frame in `.inspect`
    /// mode (its queue and its buffers, header included, valid only inside
    /// the call; it may deliver into a receive queue through the access).
    public mutating func pass(_ mode: Mode,
                              inspect: (Int, inout BurstAccess, borrowing ChainBytes) -> Void = { _, _, _ in }) -> Pass? {
        // Take the state out so the burst closure owns it uniquely (no
        // copy-on-write copies, no overlapping access to self).
        var memory = DeviceMemory(), queues: [DeviceQueue?] = [], counters: [QueueCounters] = []
        var tx = Segments(), rx = Segments()
        swap(&memory, &self.memory); swap(&queues, &self.queues); swap(&counters, &self.counters)
        swap(&tx, &txScratch); swap(&rx, &rxScratch)
        defer {
            swap(&memory, &self.memory); swap(&queues, &self.queues); swap(&counters, &self.counters)
            swap(&tx, &txScratch); swap(&rx, &rxScratch)
        }
        let budget = burst, mergeable = mergeable
        var implausible = 0
        let result = memory.burst { a -> Pass in
            var pass = Pass()
            var i = 1
            while i < queues.count {
                defer { i += 2 }
                guard var q = queues[i] else { continue }
                var c = counters[i]
                let before = c.chains + c.refusedTotal
                var call = false
                let end: BurstEnd
                switch mode {
                case .count:
                    end = q.transmitBurst(&a, budget: budget, scratch: &tx, counters: &c, call: &call) { _, frame in
                        if !Self.plausible(frame) { implausible += 1 }
                    }
                case .inspect:
                    end = q.transmitBurst(&a, budget: budget, scratch: &tx, counters: &c, call: &call) { a, frame in
                        inspect(i, &a, frame)
                    }
                case .forward:
                    var r = queues[i - 1]
                    var rc = counters[i - 1]
                    var rxStop: QueueStop?
                    end = q.transmitBurst(&a, budget: budget, scratch: &tx, counters: &c, call: &call) { a, frame in
                        guard r != nil, rxStop == nil else { rc.dropped += 1; return }
                        switch r!.deliver(&a, frame: frame, mergeable: mergeable, scratch: &rx, counters: &rc) {
                        case .delivered: break
                        case .noRoom, .tooLarge: rc.dropped += 1
                        case .stopped(let stop): rc.dropped += 1; rxStop = stop
                        }
                    }
                    if r != nil {
                        if r!.publish(&a) { pass.calls.append(i - 1) }
                        queues[i - 1] = r
                    }
                    counters[i - 1] = rc
                    if let rxStop { pass.stops.append(.init(queue: i - 1, reason: rxStop)) }
                }
                pass.chains += c.chains + c.refusedTotal - before
                switch end {
                case .drained: break
                case .budgetSpent: pass.more = true
                case .stopped(let stop): pass.stops.append(.init(queue: i, reason: stop))
                }
                if call { pass.calls.append(i) }
                queues[i] = q
                counters[i] = c
            }
            return pass
        }
        implausibleFrames += implausible
        return result
    }

    /// Delivers one frame (virtio-net header first) into receive queue
    /// `index` and publishes it; nil before the BAR exists.
    public mutating func deliver(_ frame: UnsafeRawBufferPointer, to index: Int) -> (DeviceQueue.Delivery, call: Bool)? {
        guard index >= 0, index < queues.count, var q = queues[index] else { return (.noRoom, false) }
        var c = counters[index]
        let mergeable = mergeable
        var rx = Segments()
        swap(&rx, &rxScratch)
        defer { swap(&rx, &rxScratch) }
        let result = memory.burst { a -> (DeviceQueue.Delivery, Bool) in
            let d = q.deliver(&a, frame: frame, mergeable: mergeable, scratch: &rx, counters: &c)
            return (d, q.publish(&a))
        }
        queues[index] = q
        counters[index] = c
        return result.map { ($0.0, call: $0.1) }
    }

    /// Delivers `frame` up to `times` times into receive queue `index` in
    /// one burst and publishes once (a generator's burst): stops at the
    /// first frame that is not delivered. Returns how many were, that
    /// outcome (nil: all were), and whether VM1 wants a call; nil before the
    /// BAR exists.
    public mutating func deliver(_ frame: UnsafeRawBufferPointer, times: Int, to index: Int)
        -> (delivered: Int, stop: DeviceQueue.Delivery?, call: Bool)? {
        deliver(times, to: index) { _ in frame }
    }

    /// Delivers frames `frame(0)`, `frame(1)`, … (each virtio-net header
    /// first, read only during the call) into receive queue `index` in one
    /// burst and publishes once; stops at the first that is not delivered.
    /// Returns how many were, that outcome (nil: all were), and whether
    /// VM1 wants a call; nil before the BAR exists.
    public mutating func deliver(_ count: Int, to index: Int, frame: (Int) -> UnsafeRawBufferPointer)
        -> (delivered: Int, stop: DeviceQueue.Delivery?, call: Bool)? {
        guard index >= 0, index < queues.count, var q = queues[index] else { return (0, .noRoom, false) }
        var c = counters[index]
        let mergeable = mergeable
        var rx = Segments()
        swap(&rx, &rxScratch)
        defer { swap(&rx, &rxScratch) }
        let result = memory.burst { a -> (Int, DeviceQueue.Delivery?, Bool) in
            var n = 0
            var stop: DeviceQueue.Delivery?
            while n < count {
                let d = q.deliver(&a, frame: frame(n), mergeable: mergeable, scratch: &rx, counters: &c)
                guard case .delivered = d else { stop = d; break }
                n += 1
            }
            return (n, stop, q.publish(&a))
        }
        queues[index] = q
        counters[index] = c
        return result.map { (delivered: $0.0, stop: $0.1, call: $0.2) }
    }

    /// Polling starts: drivers need not kick any queue.
    public mutating func suppressKicks() {
        var queues: [DeviceQueue?] = []
        swap(&queues, &self.queues)
        defer { swap(&queues, &self.queues) }
        _ = memory.burst { a in
            for i in queues.indices where queues[i] != nil { queues[i]!.suppressKicks(&a) }
        }
    }

    /// Polling ends: asks every transmit queue (and the receive queues in
    /// `receiving`) for kicks; true when chains arrived meanwhile (do not sleep).
    public mutating func requestKicks(receiving: Bool = false) -> Bool {
        var queues: [DeviceQueue?] = []
        swap(&queues, &self.queues)
        defer { swap(&queues, &self.queues) }
        return memory.burst { a -> Bool in
            var arrived = false
            for i in queues.indices where queues[i] != nil && (i % 2 == 1 || receiving) {
                if queues[i]!.requestKicks(&a) { arrived = true }
            }
            return arrived
        } ?? false
    }

    /// An Ethernet header with a known EtherType after the virtio-net header,
    /// read in place (gathered into a small stack buffer when it spans buffers).
    static func plausible(_ frame: borrowing ChainBytes) -> Bool {
        let need = VirtioNetHeader.size + 14
        if frame.partCount > 0, case let first = frame[0], first.count >= need {
            return EthernetCheck.isPlausible(UnsafeRawBufferPointer(rebasing: first[VirtioNetHeader.size...]))
        }
        return withUnsafeTemporaryAllocation(byteCount: need, alignment: 8) { buffer in
            let n = frame.prefix(need, into: buffer)
            return n == need && EthernetCheck.isPlausible(UnsafeRawBufferPointer(rebasing: buffer[VirtioNetHeader.size...]))
        }
    }
}
