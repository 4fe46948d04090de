import BridgeCore

/// The virtio-net header every frame starts with (VERSION_1: always 12
/// bytes, `num_buffers` at offset 10).
public enum VirtioNetHeader {
    public static let size = 12
    public static let numBuffersOffset = 10
}

/// What one queue did, kept as plain counters (folded into whatever
/// statistics the caller publishes once per pass, never per packet).
public struct QueueCounters: Sendable, Equatable {
    public var chains = 0
    public var bytes: UInt64 = 0
    public var refused = [Int](repeating: 0, count: ChainRefusal.allCases.count)
    /// Frames the device had to deliver but could not (no RX room, too large).
    public var dropped = 0
    public init() {}

    public var refusedTotal: Int { refused.reduce(0, +) }
    public mutating func note(_ r: ChainRefusal) { refused[r.rawValue] += 1 }
    public mutating func add(_ other: QueueCounters) {
        chains += other.chains
        bytes += other.bytes
        dropped += other.dropped
        for i in refused.indices { refused[i] += other.refused[i] }
    }
}

/// How a burst on one queue ended.
public enum BurstEnd: Equatable, Sendable {
    /// The ring is empty.
    case drained
    /// The budget was spent with chains still waiting.
    case budgetSpent
    case stopped(QueueStop)
}

extension DeviceQueue {
    /// Serves up to `budget` chains of a queue the device reads (VM1's TX):
    /// `frame` sees each chain's buffers in place, virtio-net header
    /// included, and the chain is completed with length 0. Chains shorter
    /// than the header are refused. One release store publishes the burst;
    /// `call` says whether the driver asked to be called.
    public mutating func transmitBurst(_ a: inout BurstAccess, budget: Int, scratch: inout Segments,
                                       counters: inout QueueCounters, call: inout Bool,
                                       _ frame: (inout BurstAccess, borrowing ChainBytes) -> Void) -> BurstEnd {
        var end = BurstEnd.budgetSpent
        var left = budget
        outer: while left > 0 {
            let available: Int
            switch pending(&a) {
            case .success(let n): available = n
            case .failure(let stop): end = .stopped(stop); break outer
            }
            if available == 0 { end = .drained; break }
            for _ in 0..<min(available, left) {
                left -= 1
                switch popChain(&a, .deviceReads, into: &scratch) {
                case .ready(let head):
                    if scratch.totalLength < VirtioNetHeader.size {
                        counters.note(.tooShort)
                    } else {
                        counters.chains += 1
                        counters.bytes += UInt64(scratch.totalLength - VirtioNetHeader.size)
                        scratch.withBytes(in: a.bar) { chain in frame(&a, chain) }
                    }
                    push(&a, head: head, length: 0)
                case .refused(let why):
                    counters.note(why)
                case .fault(let f):
                    end = .stopped(.fault(f)); break outer
                case .defect(let d):
                    end = .stopped(.defect(d)); break outer
                }
            }
        }
        if publish(&a) { call = true }
        return end
    }

    public enum Delivery: Equatable, Sendable {
        case delivered(chains: Int)
        /// No (or not enough) RX buffers: nothing was taken.
        case noRoom
        /// Larger than one chain and MRG_RXBUF is not negotiated: nothing was taken.
        case tooLarge
        case stopped(QueueStop)
    }

    /// `deliver` for one contiguous frame the caller holds.
    public mutating func deliver(_ a: inout BurstAccess, frame: UnsafeRawBufferPointer, mergeable: Bool,
                                 scratch: inout Segments, counters: inout QueueCounters) -> Delivery {
        ChainBytes.withFrame(frame) { chain in
            deliver(&a, frame: chain, mergeable: mergeable, scratch: &scratch, counters: &counters)
        }
    }

    /// Writes `frame` (virtio-net header first) into the RX buffers of a
    /// queue the device writes (VM1's RX), across several chains with
    /// `mergeable` (MRG_RXBUF), setting `num_buffers`. Not published: call
    /// `publish` once after a burst of deliveries.
    public mutating func deliver(_ a: inout BurstAccess, frame: borrowing ChainBytes, mergeable: Bool,
                                 scratch: inout Segments, counters: inout QueueCounters) -> Delivery {
        let total = frame.totalLength
        var start = mark
        var copied = 0, chains = 0
        /// Where `num_buffers` goes: in the first chain's first buffer.
        var numBuffers: UInt64?
        while copied < total || chains == 0 {
            switch pending(&a) {
            case .failure(let stop): rollBack(to: start); return .stopped(stop)
            case .success(0): rollBack(to: start); return .noRoom
            case .success: break
            }
            switch popChain(&a, .deviceWrites, into: &scratch) {
            case .ready(let head):
                if chains == 0 {
                    guard let first = scratch.parts.first, first.count >= VirtioNetHeader.size else {
                        counters.note(.tooShort)
                        push(&a, head: head, length: 0)
                        start = mark
                        continue
                    }
                    numBuffers = UInt64(first.offset + VirtioNetHeader.numBuffersOffset)
                }
                let n = scratch.fill(in: a.bar, from: frame, sourceOffset: copied)
                a.logWrite(scratch, bytes: n)
                push(&a, head: head, length: UInt32(n))
                copied += n
                chains += 1
                if copied < total, !mergeable { rollBack(to: start); return .tooLarge }
            case .refused(let why):
                counters.note(why)
                if chains == 0 { start = mark; continue }
                // A bad chain in the middle of a frame: the frame ends
                // truncated in the chains it already has (the refused one is
                // completed empty after them); the driver drops both.
                counters.dropped += 1
                if let numBuffers { a.store(UInt16(chains), numBuffers) } // marked with the first buffer (flushed after this)
                return .delivered(chains: chains)
            case .fault(let f):
                rollBack(to: start); return .stopped(.fault(f))
            case .defect(let d):
                rollBack(to: start); return .stopped(.defect(d))
            }
        }
        if let numBuffers { a.store(UInt16(chains), numBuffers) } // marked with the first buffer (flushed after this)
        counters.chains += 1
        counters.bytes += UInt64(total - min(total, VirtioNetHeader.size))
        return .delivered(chains: chains)
    }
}

/// Checks what can be checked of a frame from a real front end: an Ethernet
/// header with a known EtherType after the 12-byte virtio-net header.
public enum EthernetCheck {
    public static func isPlausible(_ frame: UnsafeRawBufferPointer) -> Bool {
        guard frame.count >= 14 else { return false }
        let etherType = UInt16(frame[12]) << 8 | UInt16(frame[13])
        return etherType == 0x0800 || etherType == 0x0806 || etherType == 0x86dd || etherType == 0x8100 || etherType < 0x0600
    }
}
