import ArgumentParser
import BridgeCore
import DeviceEngine
import Foundation
import LinuxIO

/// The device engine alone, in this process: a 2 MiB BAR (a memfd) with one
/// queue pair, the driver's side written straight into the BAR. Small enough
/// for valgrind (no 64 GiB reservation): run under callgrind and divide the
/// instructions by the frames it prints.
struct EngineBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine",
        abstract: "The DeviceEngine alone, in process: NetDevice passes over a ring of 64 B frames (count, forward or receive mode); small enough for callgrind."
    )

    @Option(help: "Rounds; each makes the whole TX ring available once.")
    var rounds: Int = 2000

    @Option(help: "count (read every frame's Ethernet header), forward (copy every frame into an RX buffer) or receive (generate: deliver a frame into every RX buffer, a burst per call).")
    var mode: String = "count"

    @Option(help: "Frame size, virtio-net header excluded.")
    var size: Int = 64

    @Flag(help: "Measure twice in this run, without and with dirty-page logging (VM1 live-migrating: every write marked in a log), and print the ratio.")
    var dirtyLog = false

    /// Where the BAR is in VM1's guest-physical memory with --dirty-log
    /// (not at 0: the engine must translate).
    static let logGPA: UInt64 = 1 << 32

    static let ringSize: UInt16 = 256
    static let barSize: UInt64 = 2 << 20
    // Layout in the BAR: RX ring at 0, TX ring at 16 KiB, RX buffers from
    // 64 KiB, TX buffers from 640 KiB (2 KiB each).
    static let rxRing = SplitRing(size: UInt32(ringSize), desc: 0, avail: 0x1000, used: 0x2000)
    static let txRing = SplitRing(size: UInt32(ringSize), desc: 0x4000, avail: 0x5000, used: 0x6000)
    static let rxBuffers: UInt64 = 0x1_0000, txBuffers: UInt64 = 0xa_0000

    func run() throws {
        guard ["count", "forward", "receive"].contains(mode) else { throw ValidationError("--mode is count, forward or receive") }
        guard dirtyLog else { _ = try measure(logging: false); return }
        let off = try measure(logging: false)
        let on = try measure(logging: true)
        print("engine \(mode) dirty logging: on/off \(String(format: "%.2f", on / off)) of the frame rate (\(String(format: "%.1f", on / 1e6)) vs \(String(format: "%.1f", off / 1e6)) Mpps)")
    }

    /// One measurement; returns frames per second.
    func measure(logging: Bool) throws -> Double {
        if mode == "receive" { return try receive(logging: logging) }
        let forward = mode == "forward"
        let n = Self.ringSize
        let (memfd, window) = try Self.bar()
        var device = try Self.device(window, memfd)
        let log = logging ? try Self.attachLog(&device) : nil
        defer { if let log { try? log.fd.close() } }
        device.setQueue(1, ring: Self.txRing, start: 0)
        // Descriptors once: TX i → a frame of `size` (+ header), RX i → 2 KiB writable.
        var frame = [UInt8](repeating: 0, count: VirtioNetHeader.size) + [UInt8](repeating: 0xff, count: 12) + [0x08, 0x00]
        frame += [UInt8](repeating: 0xab, count: max(0, size - 14))
        for i in 0..<n {
            let tx = Self.txBuffers + UInt64(i) * 2048
            for (k, b) in frame.enumerated() { _ = window.store(b, at: tx + UInt64(k)) }
            Self.descriptor(window, Self.txRing.descriptor(i), address: tx, length: UInt32(frame.count), flags: [])
            Self.descriptor(window, Self.rxRing.descriptor(i), address: Self.rxBuffers + UInt64(i) * 2048, length: 2048, flags: .write)
        }
        var avail: UInt16 = 0, rxAvail: UInt16 = 0
        var served = 0, passes = 0
        let clock = ContinuousClock()
        let start = clock.now
        for _ in 0..<rounds {
            for i in 0..<n { _ = window.store(i, at: Self.txRing.availEntry(avail &+ i)) }
            avail &+= n
            if forward, let rx = device.queue(0) {
                // Refill what the device took (descriptor i stays RX buffer i).
                while rxAvail != rx.lastAvail &+ n {
                    _ = window.store(rxAvail % n, at: Self.rxRing.availEntry(rxAvail))
                    rxAvail &+= 1
                }
                _ = window.storeRelease(rxAvail, at: Self.rxRing.availIndex)
            }
            _ = window.storeRelease(avail, at: Self.txRing.availIndex)
            while true {
                guard let pass = device.pass(forward ? .forward : .count) else { throw ValidationError("no BAR") }
                passes += 1
                served += pass.chains
                guard pass.stops.isEmpty else { throw ValidationError("stopped: \(pass.stops)") }
                if !pass.more { break }
            }
        }
        let seconds = start.duration(to: clock.now) / .seconds(1)
        let rx = device.counters.first ?? QueueCounters(), refused = device.counters.dropFirst().first?.refusedTotal ?? -1
        guard served == rounds * Int(n), refused == 0, device.implausibleFrames == 0, !forward || rx.chains == served else {
            throw ValidationError("refused \(refused), served \(served) of \(rounds * Int(n)), implausible \(device.implausibleFrames), forwarded \(rx.chains)")
        }
        print("engine \(mode)\(logging ? " (dirty logging)" : ""): \(served) frames of \(size) B in \(passes) passes, \(String(format: "%.1f", Double(served) / seconds / 1e6)) Mpps"
              + (logging ? ", \(device.memory.loggedWrites) writes logged, \(device.memory.unloggedWrites) not" : ""))
        guard !logging || (device.memory.loggedWrites > 0 && device.memory.unloggedWrites == 0) else { throw ValidationError("logging did not log") }
        return Double(served) / seconds
    }

    /// VM2 generating: every round, VM1 makes all RX buffers available and
    /// the device fills them with one frame each, in bursts of 64
    /// (`NetDevice.deliver(_:times:to:)`, what the generator does).
    func receive(logging: Bool) throws -> Double {
        let n = Self.ringSize
        let (memfd, window) = try Self.bar()
        var device = try Self.device(window, memfd)
        let log = logging ? try Self.attachLog(&device) : nil
        defer { if let log { try? log.fd.close() } }
        for i in 0..<n {
            Self.descriptor(window, Self.rxRing.descriptor(i), address: Self.rxBuffers + UInt64(i) * 2048, length: 2048, flags: .write)
        }
        var frame = [UInt8](repeating: 0, count: VirtioNetHeader.size) + [UInt8](repeating: 0xff, count: 12) + [0x08, 0x00]
        frame += [UInt8](repeating: 0xab, count: max(0, size - 14))
        var rxAvail: UInt16 = 0, delivered = 0, calls = 0
        let clock = ContinuousClock()
        let start = clock.now
        for _ in 0..<rounds {
            for _ in 0..<n {
                _ = window.store(rxAvail % n, at: Self.rxRing.availEntry(rxAvail))
                rxAvail &+= 1
            }
            _ = window.storeRelease(rxAvail, at: Self.rxRing.availIndex)
            var left = Int(n)
            while left > 0 {
                guard let (k, stop, _) = frame.withUnsafeBytes({ device.deliver($0, times: min(64, left), to: 0) }) else { throw ValidationError("no BAR") }
                calls += 1
                delivered += k
                left -= k
                if let stop { throw ValidationError("stopped after \(delivered): \(stop)") }
            }
        }
        let seconds = start.duration(to: clock.now) / .seconds(1)
        guard delivered == rounds * Int(n) else { throw ValidationError("delivered \(delivered) of \(rounds * Int(n))") }
        print("engine receive\(logging ? " (dirty logging)" : ""): \(delivered) frames of \(size) B in \(calls) bursts, \(String(format: "%.1f", Double(delivered) / seconds / 1e6)) Mpps"
              + (logging ? ", \(device.memory.loggedWrites) writes logged, \(device.memory.unloggedWrites) not" : ""))
        guard !logging || (device.memory.loggedWrites > 0 && device.memory.unloggedWrites == 0) else { throw ValidationError("logging did not log") }
        return Double(delivered) / seconds
    }

    /// Regrants the BAR at guest-physical `logGPA` and logs into a sealed
    /// log covering it (returns the log's memfd).
    static func attachLog(_ device: inout NetDevice) throws -> Memfd {
        let bytes = DirtyLog.bytesNeeded(toCover: logGPA + barSize)
        let memfd = try Memfd(name: "engine-bench-log", size: bytes)
        try memfd.addSeals([.shrink, .grow])
        device.memory.setDirtyLog(try DirtyLogMemory(adopting: memfd.fd, size: bytes, offset: 0))
        return memfd
    }

    /// A BAR over one memfd, all of it granted.
    static func bar() throws -> (Memfd, BARWindow) {
        (try Memfd(name: "engine-bench", size: barSize), try BARWindow(size: barSize))
    }

    /// A started device over `window` (`memfd` granted read/write), its
    /// receive queue 0 set up.
    static func device(_ window: BARWindow, _ memfd: Memfd) throws -> NetDevice {
        var device = NetDevice()
        device.memory.attach(window)
        try device.memory.map(bus: 0, length: barSize, permission: .readWrite, fd: memfd.fd.rawValue, fdOffset: 0, guestPhysical: logGPA)
        device.start(features: NetDevice.served.rawValue)
        device.setQueue(0, ring: rxRing, start: 0)
        return device
    }

    static func descriptor(_ w: BARWindow, _ at: UInt64, address: UInt64, length: UInt32, flags: VirtqDescriptorFlags) {
        Descriptor(address: address, length: length, flags: flags).store(to: w, at: at)
    }
}
