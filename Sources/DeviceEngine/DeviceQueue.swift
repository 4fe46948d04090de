import BridgeCore
import LinuxIO

/// Why the device refused a chain. A refused chain is completed with length
/// 0 (the driver gets its buffers back); nothing in it is touched.
public enum ChainRefusal: Int, Error, CaseIterable, Sendable, CustomStringConvertible {
    case nextOutOfRange, loop, indirect, wrongDirection, outsideBAR, notGranted, tooShort, truncated

    public var description: String {
        switch self {
        case .nextOutOfRange: "a descriptor's next index is past the ring"
        case .loop: "the chain is longer than the ring (a loop)"
        case .indirect: "an indirect descriptor (INDIRECT_DESC is not offered)"
        case .wrongDirection: "a buffer's direction does not match the queue (device-writable in TX, read-only in RX)"
        case .outsideBAR: "a buffer outside the BAR"
        case .notGranted: "a buffer VM1 did not grant (the translation was refused)"
        case .tooShort: "shorter than the 12-byte virtio-net header"
        case .truncated: "a buffer in unsealed memory VM1 truncated (never touched again)"
        }
    }
}

/// What stopped a queue before the caller's budget did.
public enum QueueStop: Error, Equatable, Sendable {
    /// A ring area or buffer is not granted: translate it, then serve again.
    case fault(AccessFault)
    /// The driver broke the ring (an index past it, a ring that cannot be
    /// served): the queue serves nothing more until it is set up again.
    case defect(String)
}

/// The device side of one split virtqueue in VM2's BAR (virtio 1.x §2.7),
/// served in bursts: chains are taken and completed, the used index is
/// published once per burst with a release store, and notifications are
/// suppressed both ways as the driver allows.
public struct DeviceQueue: Sendable {
    public enum Direction: Sendable { case deviceReads, deviceWrites }

    public let index: Int
    public let ring: SplitRing
    /// VIRTIO_F_EVENT_IDX negotiated: `used_event` / `avail_event` instead of flags.
    public let eventIndex: Bool
    public private(set) var lastAvail: UInt16
    public private(set) var usedIndex: UInt16
    private var published: UInt16
    /// The used index at the last call decision (EVENT_IDX).
    private var decidedUsed: UInt16
    /// The grant generation in which the ring's areas were last found granted.
    private var areasGrantedIn: UInt64?
    /// Whether the driver is asked to kick (false while the device polls).
    public private(set) var kicksWanted = true
    public private(set) var defect: String?
    /// Set after a translation for the chain at `lastAvail` failed: that
    /// chain's next fault refuses it instead of asking again.
    public var refuseNextFault = false

    /// `start`: the avail index to resume from (VRING's last_avail); the
    /// device completes in order, so the used index resumes there too.
    public init(index: Int, ring: SplitRing, start: UInt16, usedIndex: UInt16? = nil, eventIndex: Bool) {
        self.index = index
        self.ring = ring
        self.eventIndex = eventIndex
        lastAvail = start
        self.usedIndex = usedIndex ?? start
        published = usedIndex ?? start
        decidedUsed = usedIndex ?? start
        defect = ring.defect(eventIndex: eventIndex)
    }

    private mutating func checkAreas(_ a: inout BurstAccess) -> AccessFault? {
        if areasGrantedIn == a.generation { return nil }
        if let f = a.areaFault(ring.desc, ring.descriptorTableBytes, .read)
            ?? a.areaFault(ring.avail, ring.availBytes(eventIndex: eventIndex), .read)
            ?? a.areaFault(ring.used, ring.usedBytes(eventIndex: eventIndex), .write) {
            return f
        }
        areasGrantedIn = a.generation
        return nil
    }

    /// How many chains the driver made available that the device has not taken.
    public mutating func pending(_ a: inout BurstAccess) -> Result<Int, QueueStop> {
        if let defect { return .failure(.defect(defect)) }
        if let f = checkAreas(&a) { return .failure(.fault(f)) }
        let available = a.loadAcquire(ring.availIndex) &- lastAvail
        guard UInt32(available) <= ring.size else {
            let d = "the avail index is \(available) entries ahead of the device, more than the ring holds (\(ring.size))"
            defect = d
            return .failure(.defect(d))
        }
        return .success(Int(available))
    }

    public enum Chain: Equatable {
        case ready(head: UInt16)
        case refused(ChainRefusal)
        case fault(AccessFault)
        case defect(String)
    }

    /// Takes the next available chain (call only after `pending` > 0 in the
    /// same burst): its buffers, checked, replace `segments` (as BAR
    /// offsets: `ChainBytes` reaches them, inside this burst only). A faulting chain
    /// stays in the ring (translate, then serve again); a refused one is
    /// completed with length 0.
    public mutating func popChain(_ a: inout BurstAccess, _ direction: Direction, into segments: inout Segments) -> Chain {
        segments.removeAll()
        let head = a.load(UInt16.self, ring.availEntry(lastAvail))
        guard UInt32(head) < ring.size else {
            let d = "avail entry \(lastAvail) names descriptor \(head), past the ring of \(ring.size)"
            defect = d
            return .defect(d)
        }
        let needed: Permission = direction == .deviceReads ? .read : .write
        var i = head
        var steps: UInt32 = 0
        chain: while true {
            steps += 1
            if steps > ring.size { return refuse(&a, head, .loop) }
            let d = a.descriptor(ring, i)
            if let why = d.refusal(serving: direction) { return refuse(&a, head, why) }
            if d.length > 0 {
                switch a.part(d.address, d.length, needed) {
                case .success(let part):
                    segments.append(part)
                case .failure(let fault):
                    if case .outside = fault { return refuse(&a, head, .outsideBAR) }
                    if case .truncated = fault { return refuse(&a, head, .truncated) }
                    if refuseNextFault { return refuse(&a, head, .notGranted) }
                    return .fault(fault)
                }
            }
            switch d.link(ringSize: ring.size) {
            case .success(.end): break chain
            case .success(.next(let next)): i = next
            case .failure(let why): return refuse(&a, head, why)
            }
        }
        refuseNextFault = false
        lastAvail &+= 1
        return .ready(head: head)
    }

    private mutating func refuse(_ a: inout BurstAccess, _ head: UInt16, _ why: ChainRefusal) -> Chain {
        refuseNextFault = false
        lastAvail &+= 1
        push(&a, head: head, length: 0)
        return .refused(why)
    }

    /// Completes chain `head` with `length` bytes written (not yet published).
    public mutating func push(_ a: inout BurstAccess, head: UInt16, length: UInt32) {
        a.store(UInt32(head), ring.usedElement(usedIndex))
        a.store(length, ring.usedElementLength(usedIndex))
        usedIndex &+= 1
    }

    /// Where the queue stands, to undo a partly delivered frame.
    public struct Mark: Sendable { fileprivate var lastAvail: UInt16, usedIndex: UInt16 }
    public var mark: Mark { Mark(lastAvail: lastAvail, usedIndex: usedIndex) }
    /// Gives back chains taken since `mark` (nothing was published since).
    public mutating func rollBack(to mark: Mark) {
        lastAvail = mark.lastAvail
        usedIndex = mark.usedIndex
    }

    /// Publishes every completed chain with one release store of the used
    /// index; returns whether the driver asked to be called (NO_INTERRUPT
    /// clear, or `used_event` passed with EVENT_IDX).
    public mutating func publish(_ a: inout BurstAccess) -> Bool {
        guard usedIndex != published, areasGrantedIn == a.generation else { return false }
        a.logUsedRing(ring, eventIndex: eventIndex) // what the index publishes is in the log before it
        a.storeRelease(usedIndex, ring.usedIndex)
        published = usedIndex
        a.logUsedRing(ring, eventIndex: eventIndex) // and the index itself
        RingOrdering.fullFence()
        if eventIndex {
            let event = a.load(UInt16.self, ring.usedEvent)
            let old = decidedUsed
            decidedUsed = usedIndex
            return Self.needEvent(event, new: usedIndex, old: old)
        }
        return !VirtqAvailFlags(rawValue: a.load(UInt16.self, ring.availFlags)).contains(.noInterrupt)
    }

    /// vring_need_event (virtio 1.x §2.7.10): whether moving an index from
    /// `old` to `new` crossed `event`.
    public static func needEvent(_ event: UInt16, new: UInt16, old: UInt16) -> Bool {
        new &- event &- 1 < new &- old
    }

    /// While the device polls: the driver need not kick (VRING_USED_F_NO_NOTIFY;
    /// with EVENT_IDX the `avail_event` left behind does the same).
    public mutating func suppressKicks(_ a: inout BurstAccess) {
        guard kicksWanted, defect == nil, checkAreas(&a) == nil else { return }
        kicksWanted = false
        if !eventIndex {
            a.store(VirtqUsedFlags.noNotify.rawValue, ring.usedFlags)
            a.logUsedRing(ring, eventIndex: eventIndex)
        }
    }

    /// Before the device sleeps: asks for a kick on the next chain, then
    /// looks again. True when chains arrived meanwhile (do not sleep).
    public mutating func requestKicks(_ a: inout BurstAccess) -> Bool {
        guard defect == nil, checkAreas(&a) == nil else { return false }
        kicksWanted = true
        if eventIndex { a.store(lastAvail, ring.availEvent) } else { a.store(VirtqUsedFlags().rawValue, ring.usedFlags) }
        a.logUsedRing(ring, eventIndex: eventIndex)
        RingOrdering.fullFence()
        return a.loadAcquire(ring.availIndex) != lastAvail
    }
}
