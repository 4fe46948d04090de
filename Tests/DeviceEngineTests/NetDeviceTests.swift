import BridgeCore
import DeviceEngine
import LinuxIO
import Testing

@Suite("NetDevice") struct NetDeviceTests {
    /// Two rings in one BAR: RX (queue 0) at 0, TX (queue 1) at 0x4000.
    struct Pair {
        var rx: RingFixture
        let tx: SplitRing
        var txAvail: UInt16 = 0
        var device = NetDevice()

        init(features: VirtioNetFeatures = [.version1]) throws {
            rx = try RingFixture()
            tx = SplitRing(size: 8, desc: 0x4000, avail: 0x5000, used: 0x6000)
            device.memory = rx.memory
            device.start(features: features.rawValue)
            #expect(device.setQueue(0, ring: rx.ring, start: 0) == nil)
            #expect(device.setQueue(1, ring: tx, start: 0) == nil)
        }

        mutating func send(_ i: UInt16, _ bytes: [UInt8]) {
            let at = RingFixture.buffers + 0x8000 + UInt64(i) * 2048
            rx.poke(bytes, at: at)
            var d: [UInt8] = withUnsafeBytes(of: at.littleEndian, Array.init)
            d += withUnsafeBytes(of: UInt32(bytes.count).littleEndian, Array.init) + [0, 0, 0, 0]
            rx.poke(d, at: tx.descriptor(i))
            rx.poke16(i, at: tx.availEntry(txAvail))
            txAvail &+= 1
            rx.poke16(txAvail, at: tx.availIndex)
        }
    }

    @Test func forwardingWritesEveryFrameIntoTheRXBuffersOfTheSamePair() throws {
        var p = try Pair()
        for i in 0..<3 { p.rx.postReceive(UInt16(i)) }
        let frames = (0..<4).map { RingFixture.frame(payload: 40 + $0, fill: UInt8($0)) }
        for (i, f) in frames.enumerated() { p.send(UInt16(i), f) }
        let result = p.device.pass(.forward)
        let pass = try #require(result)
        #expect(pass.chains == 4)
        #expect(Set(pass.calls) == [0, 1])
        #expect(p.rx.usedIndex == 3)
        for i in 0..<3 {
            let got = p.rx.peek(frames[i].count, at: RingFixture.buffers + UInt64(i) * 2048)
            #expect(Array(got[12...]) == Array(frames[i][12...]))
            #expect(got[10] == 1, "num_buffers")
        }
        #expect(p.device.counters[0].chains == 3 && p.device.counters[0].dropped == 1, "the fourth had no room")
        #expect(p.rx.peek16(p.tx.usedIndex) == 4)
    }

    @Test func countModeChecksEthernetHeadersInPlace() throws {
        var p = try Pair()
        p.send(0, RingFixture.frame(payload: 40))
        var bad = RingFixture.frame(payload: 40)
        bad[24] = 0x12; bad[25] = 0x34 // not a known EtherType
        p.send(1, bad)
        let result = p.device.pass(.count)
        let pass = try #require(result)
        #expect(pass.chains == 2)
        #expect(p.device.implausibleFrames == 1)
        #expect(p.device.counters[1].chains == 2)
    }

    @Test func eventIndexAndMergeableComeFromTheNegotiatedFeatures() throws {
        var p = try Pair(features: [.version1, .eventIdx, .mrgRxbuf])
        #expect(p.device.queue(1)?.eventIndex == true)
        #expect(p.device.mergeable)
        for i in 0..<3 { p.rx.postReceive(UInt16(i), length: 64) }
        p.send(0, RingFixture.frame(payload: 150)) // 176 bytes: three 64-byte buffers
        let result = p.device.pass(.forward)
        let pass = try #require(result)
        #expect(pass.chains == 1 && p.rx.usedIndex == 3)
        #expect(p.rx.peek(1, at: RingFixture.buffers + 10) == [3])
    }

    @Test func aPassHandsFramesToInspectAndStopsOnFaults() throws {
        var p = try Pair()
        p.send(0, RingFixture.frame(payload: 40))
        var seen: [Int] = []
        _ = p.device.pass(.inspect) { queue, _, frame in seen.append(frame.totalLength * 10 + queue) }
        #expect(seen == [66 * 10 + 1])
        p.device.memory.unmap(bus: RingFixture.buffers + 0x8000, length: 0x1000)
        p.send(1, RingFixture.frame(payload: 40))
        let result = p.device.pass(.count)
        let pass = try #require(result)
        #expect(pass.stops == [.init(queue: 1, reason: .fault(.missing(address: RingFixture.buffers + 0x8000 + 2048, length: 66, access: .read)))])
        #expect(pass.chains == 0)
    }
}
