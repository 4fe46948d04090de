import BridgeCore
import CVhostPCIDevice
import DeviceEngine
import PeerDevice

// libvhost-pci-device: the C ABI of vhost_pci_device.h over `DeviceClient`.
// Only C types cross: opaque device pointers, the header's structs, return
// codes. Every entry point checks its pointers and sizes; nothing throws
// or traps across the boundary on a caller's bad argument.

/// The state behind a `struct vpd_device *`.
final class CDevice {
    let client: DeviceClient
    let callbacks: vpd_callbacks?
    let ctx: UnsafeMutableRawPointer?
    /// A call is running (a callback calling back in gets VPD_EBUSY).
    var busy = false
    /// `vpd_close` from a callback: done when the running call returns.
    var closeRequested = false
    /// Frames longer than VPD_FRAME_MAX, given back to VM1 unseen.
    var oversize: UInt64 = 0
    /// `vpd_device_error`'s text, NUL-terminated (empty: none yet).
    let error = UnsafeMutablePointer<CChar>.allocate(capacity: CDevice.errorCapacity)
    static let errorCapacity = 512
    /// The segments of the frame a `vpd_frame_fn` sees.
    var segments: UnsafeMutablePointer<vpd_segment>
    var segmentCapacity = 64

    init(client: DeviceClient, callbacks: vpd_callbacks?, ctx: UnsafeMutableRawPointer?) {
        self.client = client
        self.callbacks = callbacks
        self.ctx = ctx
        segments = .allocate(capacity: segmentCapacity)
        error[0] = 0
    }

    deinit {
        segments.deallocate()
        error.deallocate()
        client.close()
    }

    func note(_ text: String) { write(text, to: error, size: CDevice.errorCapacity) }

    /// The code for `e`, with its text kept for `vpd_device_error`.
    func code(_ e: DeviceClientError) -> Int32 {
        note(e.description)
        return CDevice.code(e)
    }

    static func code(_ e: DeviceClientError) -> Int32 {
        switch e {
        case .connect: VPD_ECONNECT
        case .refused: VPD_EREFUSED
        case .timedOut: VPD_ETIMEDOUT
        case .closed: VPD_ECLOSED
        case .invalid: VPD_EINVAL
        }
    }

    /// Runs `body` unless a call is running already; then the events it
    /// caused go to the callbacks.
    func call(_ body: () throws(DeviceClientError) -> Int32) -> Int32 {
        guard !busy else { return VPD_EBUSY }
        busy = true
        var result: Int32
        do { result = try body() } catch { result = code(error) }
        dispatchEvents()
        busy = false
        if closeRequested {
            finishClose()
            result = VPD_ECLOSED
        }
        return result
    }

    /// Closes and drops the C caller's reference (the caller of this still
    /// holds one until it returns).
    func finishClose() {
        client.close()
        Unmanaged.passUnretained(self).release()
    }

    func dispatchEvents() {
        let events = client.takeEvents()
        guard let c = callbacks, !events.isEmpty else { return }
        for event in events where !closeRequested {
            switch event {
            case .deviceStarted(let features): c.device_started?(ctx, features)
            case .deviceStopped: c.device_stopped?(ctx)
            case .ringStarted(let q): c.ring_started?(ctx, UInt32(truncatingIfNeeded: q))
            case .ringStopped(let q): c.ring_stopped?(ctx, UInt32(truncatingIfNeeded: q))
            case .revoked(let offset, let length): c.revoked?(ctx, offset, length)
            }
        }
    }

    /// The frame's buffers after the virtio-net header, as `vpd_segment`s.
    func withSegments<R>(_ frame: borrowing ChainBytes, _ body: (UnsafePointer<vpd_segment>, Int, Int) -> R) -> R {
        if frame.partCount > segmentCapacity {
            segments.deallocate()
            segmentCapacity = frame.partCount
            segments = .allocate(capacity: segmentCapacity)
        }
        var skip = VirtioNetHeader.size, n = 0, length = 0
        for i in 0..<frame.partCount {
            let part = frame[i]
            guard part.count > skip, let base = part.baseAddress else { skip -= min(skip, part.count); continue }
            let len = part.count - skip
            segments[n] = vpd_segment(base: (base + skip).assumingMemoryBound(to: UInt8.self), len: UInt32(truncatingIfNeeded: len))
            skip = 0
            n += 1
            length += len
        }
        return body(segments, n, length)
    }
}

private func device(_ p: OpaquePointer?) -> CDevice? {
    guard let p else { return nil }
    return Unmanaged<CDevice>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

private func write(_ text: String, to buffer: UnsafeMutablePointer<CChar>?, size: Int) {
    guard let buffer, size > 0 else { return }
    let bytes = Array(text.utf8.prefix(size - 1))
    for (i, b) in bytes.enumerated() { buffer[i] = CChar(bitPattern: b) }
    buffer[bytes.count] = 0
}

@_cdecl("vpd_connect")
public func vpdConnect(_ path: UnsafePointer<CChar>?, _ config: UnsafePointer<vpd_config>?,
                       _ out: UnsafeMutablePointer<OpaquePointer?>?,
                       _ errorText: UnsafeMutablePointer<CChar>?, _ errorSize: Int) -> Int32 {
    guard let path, let out else {
        write("peer_socket and out must not be NULL", to: errorText, size: errorSize)
        return VPD_EINVAL
    }
    out.pointee = nil
    var c = vpd_config()
    if let config {
        guard config.pointee.size >= UInt32(MemoryLayout<vpd_config>.size) else {
            write("vpd_config.size is \(config.pointee.size), not sizeof(struct vpd_config) = \(MemoryLayout<vpd_config>.size)",
                  to: errorText, size: errorSize)
            return VPD_EINVAL
        }
        c = config.pointee
    }
    let served = NetDevice.served
    var features = served
    if c.device_features != 0 {
        let asked = VirtioNetFeatures(rawValue: c.device_features)
        guard served.isSuperset(of: asked) else {
            write("device_features 0x\(String(c.device_features, radix: 16)) has bits the library does not serve (it serves 0x\(String(served.rawValue, radix: 16)))",
                  to: errorText, size: errorSize)
            return VPD_EINVAL
        }
        features = asked
    }
    let timeout = c.connect_timeout_ms == 0 ? 5000 : Int(c.connect_timeout_ms)
    do {
        let client = try DeviceClient(peerSocketPath: String(cString: path), deviceFeatures: features,
                                      burst: c.burst == 0 ? 64 : Int(c.burst), logsDirtyPages: c.no_dirty_log == 0,
                                      within: .milliseconds(timeout))
        let d = CDevice(client: client, callbacks: c.callbacks?.pointee, ctx: c.ctx)
        out.pointee = OpaquePointer(Unmanaged.passRetained(d).toOpaque())
        // The events of the handshake go to the callbacks like any call's
        // (a callback may close the device already).
        guard d.call({ VPD_OK }) == VPD_OK else {
            out.pointee = nil
            write("closed by a callback during vpd_connect", to: errorText, size: errorSize)
            return VPD_ECLOSED
        }
        return VPD_OK
    } catch {
        write(error.description, to: errorText, size: errorSize)
        return CDevice.code(error)
    }
}

@_cdecl("vpd_poll")
public func vpdPoll(_ dev: OpaquePointer?, _ timeout: Int32) -> Int32 {
    guard let d = device(dev) else { return VPD_EINVAL }
    return d.call { () throws(DeviceClientError) -> Int32 in try d.client.poll(timeoutMilliseconds: timeout) ? 1 : 0 }
}

@_cdecl("vpd_receive_burst")
public func vpdReceiveBurst(_ dev: OpaquePointer?, _ fn: vpd_frame_fn?, _ arg: UnsafeMutableRawPointer?) -> Int32 {
    guard let d = device(dev), let fn else { return VPD_EINVAL }
    return d.call { () throws(DeviceClientError) -> Int32 in
        var skipped = 0
        let n = try d.client.receive { pair, frame in
            // A chain may be longer than any frame (VM1 chose it): given
            // back unseen, counted; lengths then always fit the struct.
            guard !d.closeRequested, frame.totalLength - VirtioNetHeader.size <= Int(VPD_FRAME_MAX) else {
                if !d.closeRequested { d.oversize += 1 }
                skipped += 1
                return
            }
            d.withSegments(frame) { segments, count, length in
                var f = vpd_frame(queue_pair: UInt32(truncatingIfNeeded: pair), length: UInt32(truncatingIfNeeded: length),
                                  segment_count: UInt32(truncatingIfNeeded: count), segments: segments)
                fn(arg, &f)
            }
        }
        return Int32(clamping: n - skipped)
    }
}

@_cdecl("vpd_transmit_burst")
public func vpdTransmitBurst(_ dev: OpaquePointer?, _ queuePair: UInt32, _ frames: UnsafePointer<vpd_buffer>?, _ count: UInt32) -> Int32 {
    guard let d = device(dev) else { return VPD_EINVAL }
    guard count > 0 else { return 0 }
    guard let frames else { d.note("frames is NULL"); return VPD_EINVAL }
    for i in 0..<Int(count) where frames[i].data == nil && frames[i].len > 0 {
        d.note("frame \(i) has no data")
        return VPD_EINVAL
    }
    return d.call { () throws(DeviceClientError) -> Int32 in
        let n = try d.client.transmit(Int(count), queuePair: Int(queuePair)) { i in
            UnsafeRawBufferPointer(start: frames[i].data, count: Int(frames[i].len))
        }
        return Int32(clamping: n)
    }
}

@_cdecl("vpd_read")
public func vpdRead(_ dev: OpaquePointer?, _ offset: UInt64, _ dst: UnsafeMutableRawPointer?, _ len: Int) -> Int32 {
    guard let d = device(dev) else { return VPD_EINVAL }
    guard len >= 0 else { d.note("len \(UInt(bitPattern: len)) is larger than any BAR"); return VPD_EINVAL }
    guard dst != nil || len == 0 else { d.note("dst is NULL"); return VPD_EINVAL }
    return d.call { () throws(DeviceClientError) -> Int32 in
        guard let fault = try d.client.read(barOffset: offset, into: UnsafeMutableRawBufferPointer(start: dst, count: len)) else { return VPD_OK }
        d.note("\(fault)")
        return VPD_EFAULT
    }
}

@_cdecl("vpd_get_stats")
public func vpdGetStats(_ dev: OpaquePointer?, _ stats: UnsafeMutablePointer<vpd_stats>?, _ size: Int) -> Int32 {
    guard let d = device(dev), let stats, size >= MemoryLayout<vpd_stats>.size else { return VPD_EINVAL }
    let s = d.client.statistics
    stats.pointee = vpd_stats(
        frames_received: UInt64(s.packetsReceived), bytes_received: s.bytesReceived,
        frames_sent: UInt64(s.packetsSent), bytes_sent: s.bytesSent, frames_dropped: UInt64(s.echoesDropped) + d.oversize,
        descriptors_refused: UInt64(s.descriptorsRefused), maps: UInt64(s.mapsApplied), unmaps: UInt64(s.unmapsApplied),
        bytes_mapped: s.bytesMapped, bar_size: s.barSize)
    return VPD_OK
}

@_cdecl("vpd_device_error")
public func vpdDeviceError(_ dev: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let d = device(dev) else { return nil }
    if let reason = d.client.endReason, d.error[0] == 0 { d.note(reason) }
    return UnsafePointer(d.error)
}

@_cdecl("vpd_close")
public func vpdClose(_ dev: OpaquePointer?) {
    guard let dev else { return }
    let d = Unmanaged<CDevice>.fromOpaque(UnsafeRawPointer(dev))
    let device = d.takeUnretainedValue()
    // From a callback: the running call closes it when it returns.
    if device.busy {
        device.closeRequested = true
        return
    }
    device.client.close()
    d.release()
}
