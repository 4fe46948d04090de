import BridgeCore
import CVhostPCIDevice
import EmulatedGuests
import LinuxIO
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif
import TestSupport

/// libvhost-pci-device through its C declarations (vhost_pci_device.h), as a
/// C caller sees it: the calls resolve to the library's exported symbols.
private final class CCaller: Sendable {
    /// The device pointer (an address, so threads can share it), behind the
    /// lock that serializes every call on it, as the header's thread rule
    /// requires. (The lock guards the pointer itself: a `Locked(())`, a lock
    /// around nothing, was reported by TSan as a race on its empty value.)
    private let device: Locked<Int>

    init(peerPath: String) throws {
        var callbacks = vpd_callbacks()
        callbacks.revoked = { ctx, offset, length in
            guard let ctx else { return }
            Unmanaged<CCallerContext>.fromOpaque(ctx).takeUnretainedValue().revoked.withLock { $0.append((offset, length)) }
        }
        callbacks.ring_started = { ctx, queue in
            guard let ctx else { return }
            Unmanaged<CCallerContext>.fromOpaque(ctx).takeUnretainedValue().rings.withLock { $0.append(queue) }
        }
        let context = CCallerContext()
        var raw: OpaquePointer?
        var why = [CChar](repeating: 0, count: 256)
        let rc = withUnsafePointer(to: &callbacks) { cb in
            var config = vpd_config()
            config.size = UInt32(MemoryLayout<vpd_config>.size)
            config.callbacks = cb
            config.ctx = Unmanaged.passUnretained(context).toOpaque()
            return vpd_connect(peerPath, &config, &raw, &why, why.count)
        }
        guard rc == VPD_OK, let raw else {
            throw CCallerError.connect(rc, text(why))
        }
        device = Locked(Int(bitPattern: UnsafeRawPointer(raw)))
        self.context = context
    }

    private let context: CCallerContext

    var revocations: [(UInt64, UInt64)] { context.revoked.withLock { $0 } }
    var rings: [UInt32] { context.rings.withLock { $0 } }

    func call<R>(_ body: (OpaquePointer) -> R) -> R {
        device.withLock { address in body(OpaquePointer(bitPattern: address)!) }
    }

    func close() { call { vpd_close($0) } }
}

private final class CCallerContext: Sendable {
    let revoked = Locked<[(UInt64, UInt64)]>([])
    let rings = Locked<[UInt32]>([])
}

private enum CCallerError: Error { case connect(Int32, String) }

/// A NUL-terminated C string in `buffer`.
private func text(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// A thread that keeps calling `vpd_poll` (and `body`, if any) until stopped:
/// the application's loop, so revocations are answered while a test waits.
private final class StopFlag: Sendable {
    let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}

private func pollingThread(_ c: CCaller, stop: StopFlag, body: @escaping @Sendable (OpaquePointer) -> Void = { _ in }) throws -> JoinableThread {
    try JoinableThread(name: "c-caller") {
        while !stop.isSet {
            let rc = c.call { d -> Int32 in
                let rc = vpd_poll(d, 0)
                if rc >= 0 { body(d) }
                return rc
            }
            if rc < 0 { break }
            usleep(500)
        }
    }
}

extension Integration {
    @Suite struct DeviceAPI {
        /// VM1 grants a page through its vIOMMU: a C caller reads it through
        /// `vpd_read`; VM1 unmaps it: the same read fails with VPD_EFAULT and
        /// copies nothing, the `revoked` callback names the range, and a read
        /// that ends past a grant never succeeds.
        @Test func aCCallerCannotReadARevokedRange() throws {
            let running = try RunningBridge("capi-revoke", mode: .iommu)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: true))
            defer { vm1.disconnect() }
            try vm1.start()
            let iommu = try #require(vm1.iommu)
            let before = settledOpenFileDescriptorCount()
            let c = try CCaller(peerPath: running.peerPath)
            let stop = StopFlag()
            let poller = try pollingThread(c, stop: stop)

            let gpa = GuestPhysicalAddress(0x90_0000)
            let pattern = (0..<64).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
            #expect(vm1.ram.write(pattern, at: gpa))
            // Read-write: a first read-only grant makes the bridge reopen
            // VM1's region read-only, an fd it keeps while VM1 does.
            let iova = try iommu.map(gpa, length: 4096, permission: .readWrite, eager: true)
            var buffer = [UInt8](repeating: 0, count: 64)
            let readable = pollUntil {
                c.call { d in buffer.withUnsafeMutableBytes { vpd_read(d, iova.rawValue, $0.baseAddress, 64) } } == VPD_OK
            }
            #expect(readable, "the granted page never became readable")
            #expect(buffer == pattern)
            // Eight bytes past the grant's end: refused as a whole.
            #expect(c.call { d in buffer.withUnsafeMutableBytes { vpd_read(d, iova.rawValue + 4096 - 8, $0.baseAddress, 16) } } == VPD_EFAULT)

            try iommu.unmap(iova) // returns once VM2 (the C caller's poll) acked
            buffer = [UInt8](repeating: 0xee, count: 64)
            #expect(c.call { d in buffer.withUnsafeMutableBytes { vpd_read(d, iova.rawValue, $0.baseAddress, 64) } } == VPD_EFAULT)
            #expect(buffer == [UInt8](repeating: 0xee, count: 64), "nothing is copied from a revoked range")
            let why = c.call { vpd_device_error($0).map { String(cString: $0) } ?? "" }
            #expect(why.contains("\(iova.rawValue)") || why.contains(String(iova.rawValue, radix: 16)), "\(why)")
            #expect(c.revocations.contains { $0.0 <= iova.rawValue && iova.rawValue + 64 <= $0.0 + $0.1 }, "\(c.revocations)")
            // The BAR's bytes are gone from the process too (the bridge's view).
            #expect(running.bridge.window.probeInChild(iova) == .faulted)

            stop.set()
            poller.join()
            c.close()
            #expect(pollUntil { openFileDescriptorCount() == before }, "fds: \(before) before, \(openFileDescriptorCount()) after")
        }

        /// A C caller that sends back every frame VM1 transmits (copied in
        /// its receive callback, written with `vpd_transmit_burst`): VM1
        /// verifies each echo; a call from inside a callback is refused.
        @Test func aCCallerEchoesVM1sTraffic() throws {
            let running = try RunningBridge("capi-echo", mode: .identity)
            defer { running.stop() }
            let c = try CCaller(peerPath: running.peerPath)
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: false))
            defer { vm1.disconnect() }
            try vm1.start()
            let echo = EchoState()
            let stop = StopFlag()
            let poller = try pollingThread(c, stop: stop) { d in echo.pass(d) }

            let result = try vm1.runTraffic(count: 96, sizes: [64, 1500, 9000])
            stop.set()
            poller.join()
            #expect(result.completed && result.verified == 96 && result.corrupt == 0, "\(result)")
            #expect(echo.nested.load(ordering: .acquiring) == Int(VPD_EBUSY), "a call from a callback is refused")
            var stats = vpd_stats()
            #expect(c.call { vpd_get_stats($0, &stats, MemoryLayout<vpd_stats>.size) } == VPD_OK)
            #expect(stats.frames_received == 96 && stats.frames_sent == 96 && stats.descriptors_refused == 0, "\(stats)")
            #expect(c.rings.contains(0) && c.rings.contains(1), "\(c.rings)")
            c.close()
        }

        /// An idle device's poll sleeps: with VM1's receive buffers posted and
        /// nothing to send, `vpd_poll` says nothing waits (it used to ask
        /// VM1 for receive kicks and find "work" every time).
        @Test func anIdleDevicesPollFindsNothingWaiting() throws {
            let running = try RunningBridge("capi-idle", mode: .identity)
            defer { running.stop() }
            let c = try CCaller(peerPath: running.peerPath)
            defer { c.close() }
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: false))
            defer { vm1.disconnect() }
            try vm1.start()
            // The rings start (their events come through poll), then quiet.
            #expect(pollUntil { _ = c.call { vpd_poll($0, 0) }; return c.rings.contains(0) && c.rings.contains(1) })
            try vm1.postReceiveBuffers(16)
            var results: [Int32] = []
            for _ in 0..<5 { results.append(c.call { vpd_poll($0, 1) }) }
            #expect(results.last == 0, "poll results: \(results)")
        }

        /// `vpd_close` from inside a frame callback: the burst returns
        /// VPD_ECLOSED, nothing crashes, every fd of the device is gone.
        @Test func closingFromACallbackTakesEffectWhenTheCallReturns() throws {
            let running = try RunningBridge("capi-close", mode: .identity)
            defer { running.stop() }
            let vm1 = try EmulatedVM1(socketPath: running.path, configuration: vm1Config(iommu: false))
            defer { vm1.disconnect() }
            try vm1.start()
            let before = settledOpenFileDescriptorCount()
            let c = try CCaller(peerPath: running.peerPath)
            #expect(pollUntil { running.bridge.statistics.peer.ready })
            #expect(pollUntil { _ = c.call { vpd_poll($0, 0) }; return c.rings.contains(1) })
            _ = try vm1.send(TestPacket.make(sequence: 1, size: 64))
            let closer = Closer()
            var rc: Int32 = 0
            #expect(pollUntil {
                rc = c.call { d in
                    closer.device.store(Int(bitPattern: UnsafeRawPointer(d)), ordering: .releasing)
                    _ = vpd_poll(d, 0)
                    return vpd_receive_burst(d, { arg, _ in
                        guard let arg else { return }
                        let me = Unmanaged<Closer>.fromOpaque(arg).takeUnretainedValue()
                        guard let d = OpaquePointer(bitPattern: me.device.load(ordering: .acquiring)) else { return }
                        vpd_close(d) // from inside the callback
                        me.closed.store(true, ordering: .releasing)
                    }, Unmanaged.passUnretained(closer).toOpaque())
                }
                return closer.closed.load(ordering: .acquiring)
            })
            #expect(rc == VPD_ECLOSED)
            #expect(pollUntil { !running.bridge.statistics.peer.connected })
            #expect(pollUntil { openFileDescriptorCount() == before }, "fds: \(before) before, \(openFileDescriptorCount()) after")
        }

        /// Bad arguments are refused with a code and a reason, never a crash.
        @Test func badArgumentsAreRefused() throws {
            var out: OpaquePointer?
            var why = [CChar](repeating: 0, count: 128)
            #expect(vpd_connect(nil, nil, &out, &why, why.count) == VPD_EINVAL)
            #expect(vpd_connect("/tmp/vpb-no-such-peer.sock", nil, &out, &why, why.count) == VPD_ECONNECT && out == nil)
            #expect(text(why).contains("connect"), "\(text(why))")
            var config = vpd_config()
            config.size = 4
            #expect(vpd_connect("/tmp/vpb-no-such-peer.sock", &config, &out, &why, why.count) == VPD_EINVAL)
            #expect(text(why).contains("sizeof"))
            config.size = UInt32(MemoryLayout<vpd_config>.size)
            config.device_features = 1 << 5 // VIRTIO_NET_F_MAC: not served
            #expect(vpd_connect("/tmp/vpb-no-such-peer.sock", &config, &out, &why, why.count) == VPD_EINVAL)
            // A short error buffer is truncated, still NUL-terminated.
            var tiny = [CChar](repeating: 1, count: 4)
            #expect(vpd_connect("/tmp/vpb-no-such-peer.sock", nil, &out, &tiny, tiny.count) == VPD_ECONNECT && tiny[3] == 0)
            #expect(vpd_poll(nil, 0) == VPD_EINVAL && vpd_receive_burst(nil, nil, nil) == VPD_EINVAL)
            #expect(vpd_read(nil, 0, nil, 0) == VPD_EINVAL && vpd_get_stats(nil, nil, 0) == VPD_EINVAL)
            vpd_close(nil)
            for code in [VPD_OK, VPD_EINVAL, VPD_ECONNECT, VPD_EREFUSED, VPD_ETIMEDOUT, VPD_ECLOSED, VPD_EBUSY, VPD_EFAULT, VPD_ENOMEM] {
                #expect(String(cString: vpd_strerror(code)) != String(cString: vpd_strerror(-1000)))
            }
            #expect(vpd_abi_version() == UInt32(VPD_ABI_VERSION))

            // With a device: NULL buffers, a short stats size, a queue pair out of range.
            let running = try RunningBridge("capi-args", mode: .identity)
            defer { running.stop() }
            let c = try CCaller(peerPath: running.peerPath)
            defer { c.close() }
            #expect(c.call { vpd_read($0, 0, nil, 16) } == VPD_EINVAL)
            var stats = vpd_stats()
            #expect(c.call { vpd_get_stats($0, &stats, 8) } == VPD_EINVAL)
            #expect(c.call { vpd_transmit_burst($0, 0, nil, 1) } == VPD_EINVAL)
            var frame = vpd_buffer(data: nil, len: 64)
            #expect(c.call { vpd_transmit_burst($0, 0, &frame, 1) } == VPD_EINVAL)
            let byte = [UInt8](repeating: 0, count: 64)
            let rc = byte.withUnsafeBytes { b in
                var f = vpd_buffer(data: b.baseAddress, len: 64)
                return c.call { vpd_transmit_burst($0, 1 << 16, &f, 1) }
            }
            #expect(rc == VPD_EINVAL)
            // Nothing granted yet: any read is refused.
            var buffer = [UInt8](repeating: 0, count: 8)
            #expect(c.call { d in buffer.withUnsafeMutableBytes { vpd_read(d, 0, $0.baseAddress, 8) } } == VPD_EFAULT)
        }

        /// The bridge going away ends the device: VPD_ECLOSED, with the reason.
        @Test func theBridgeEndingTheConnectionIsReported() throws {
            let running = try RunningBridge("capi-end", mode: .identity)
            let c = try CCaller(peerPath: running.peerPath)
            running.stop()
            let ended = pollUntil { c.call { vpd_poll($0, 10) } == VPD_ECLOSED }
            #expect(ended)
            #expect(!c.call { vpd_device_error($0).map { String(cString: $0) } ?? "" }.isEmpty)
            c.close()
        }
    }
}

private final class Closer: Sendable {
    let device = Atomic<Int>(0)
    let closed = Atomic<Bool>(false)
}

/// The echo loop's state: frames copied in the receive callback, then sent.
private final class EchoState: Sendable {
    let frames = Locked<[[UInt8]]>([])
    let nested = Atomic<Int>(0)
    let device = Atomic<Int>(0)

    func pass(_ d: OpaquePointer) {
        device.store(Int(bitPattern: UnsafeRawPointer(d)), ordering: .releasing)
        let arg = Unmanaged.passUnretained(self).toOpaque()
        _ = vpd_receive_burst(d, { arg, frame in
            guard let arg, let frame else { return }
            let me = Unmanaged<EchoState>.fromOpaque(arg).takeUnretainedValue()
            var bytes: [UInt8] = []
            for i in 0..<Int(frame.pointee.segment_count) {
                let s = frame.pointee.segments[i]
                bytes.append(contentsOf: UnsafeBufferPointer(start: s.base, count: Int(s.len)))
            }
            me.frames.withLock { $0.append(bytes) }
            if me.nested.load(ordering: .acquiring) == 0, let d = OpaquePointer(bitPattern: me.device.load(ordering: .acquiring)) {
                me.nested.store(Int(vpd_poll(d, 0)), ordering: .releasing)
            }
        }, arg)
        var pending = frames.withLock { f -> [[UInt8]] in defer { f = [] }; return f }
        while !pending.isEmpty {
            let sent = pending[0].withUnsafeBytes { b -> Int32 in
                var f = vpd_buffer(data: b.baseAddress, len: UInt32(b.count))
                return vpd_transmit_burst(d, 0, &f, 1)
            }
            guard sent == 1 else { break }
            pending.removeFirst()
        }
        if !pending.isEmpty { frames.withLock { $0.insert(contentsOf: pending, at: 0) } }
    }
}
