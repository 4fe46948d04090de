import LinuxIO

/// The io-wq path, kept as a benchmark row: an io_uring relay thread (ring
/// made there, single issuer, as the daemon's) whose read is linked to a
/// write of 1 *without* RWF_NOWAIT, so a write to a blocking eventfd is
/// handed to an io-wq worker, unbounded. The daemon's relay never takes this
/// path (its linked write carries RWF_NOWAIT; a blocking target gets a
/// bounded write after a POLLOUT check): this row shows what that avoids.
/// Counts as the daemon does: the values read (kicks) and the reads that
/// returned something (wakeups), per pair, published once per batch.
final class LinkedWriteRelay: Sendable {
    private let stopSignal: EventFD
    private let thread = Locked<JoinableThread?>(nil)
    /// Per pair: (values read, wakeups).
    private let counts: Locked<[(taken: UInt64, wakeups: UInt64)]>

    private enum RingSetup { case ready, failed(String) }

    private static let stopData = UInt64.max
    private static let cancelData = UInt64.max - 1
    private static func userData(_ pair: Int, write: Bool) -> UInt64 { UInt64(pair) << 1 | (write ? 1 : 0) }

    /// Relays `source[i] → target[i]`; takes ownership of the fds.
    init(_ pairs: [(source: OwnedFileDescriptor, target: OwnedFileDescriptor)]) throws {
        stopSignal = try EventFD()
        counts = Locked(Array(repeating: (0, 0), count: pairs.count))
        let started = try EventFD()
        /// nil until the relay thread has its ring or failed to make it.
        let setup = Locked<RingSetup?>(nil)
        let t = try JoinableThread(name: "iowq-relay") { [self] in
            let ring: URing
            do { ring = try URing(entries: 1024, sqpoll: false, singleIssuer: true) } catch {
                setup.withLock { $0 = .failed("\(error)") }
                _ = try? started.signal()
                return
            }
            setup.withLock { $0 = .ready }
            _ = try? started.signal()
            run(ring, pairs)
        }
        let outcome = started.wait(until: nil) { setup.withLock { $0 } }
        if case .failed(let failure) = outcome {
            t.join()
            throw SystemCallError("io_uring: \(failure)", errno: .notSupported)
        }
        thread.withLock { $0 = t }
    }

    private func run(_ ring: URing, _ pairs: [(source: OwnedFileDescriptor, target: OwnedFileDescriptor)]) {
        let buffers = UnsafeMutablePointer<UInt64>.allocate(capacity: pairs.count + 1)
        buffers.initialize(repeating: 0, count: pairs.count + 1)
        let one = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        one.initialize(to: 1)
        defer { buffers.deallocate(); one.deallocate() }
        var pending = Array(repeating: 0, count: pairs.count)
        var batch = Array(repeating: (taken: UInt64(0), wakeups: UInt64(0)), count: pairs.count)

        func arm(_ i: Int) {
            if ring.submissionSpaceLeft < 2 { _ = try? ring.submit() }
            guard (try? ring.prepareRead(fd: pairs[i].source.rawValue, buffer: buffers + i, length: 8,
                                         userData: Self.userData(i, write: false), linkNext: true)) != nil,
                  (try? ring.prepareWrite(fd: pairs[i].target.rawValue, buffer: one, length: 8,
                                          userData: Self.userData(i, write: true), noWait: false)) != nil else { return }
            pending[i] += 2
        }
        for i in pairs.indices { arm(i) }
        _ = try? ring.prepareRead(fd: stopSignal.fd.rawValue, buffer: buffers + pairs.count, length: 8, userData: Self.stopData)
        var running = true
        while running {
            guard (try? ring.submitAndWait(1)) != nil else { break }
            ring.reap { c in
                if c.userData == Self.stopData { running = false; return }
                if c.userData == Self.cancelData { return }
                let i = Int(c.userData >> 1)
                pending[i] -= 1
                if c.userData & 1 == 0, c.result == 8 {
                    batch[i].taken &+= buffers[i]
                    batch[i].wakeups &+= 1
                }
                if pending[i] == 0, running { arm(i) }
            }
            counts.withLock { c in
                for i in batch.indices where batch[i].wakeups > 0 {
                    c[i].taken &+= batch[i].taken
                    c[i].wakeups &+= batch[i].wakeups
                    batch[i] = (0, 0)
                }
            }
        }
        // Cancel what is in flight (a write blocked in io-wq is interrupted)
        // and wait for it, so no buffer is freed under an operation.
        for i in pairs.indices where pending[i] > 0 {
            for write in [false, true] {
                if ring.submissionSpaceLeft < 1 { _ = try? ring.submit() }
                _ = try? ring.prepareCancel(target: Self.userData(i, write: write), userData: Self.cancelData)
            }
        }
        var rounds = 0
        while pending.contains(where: { $0 > 0 }), rounds < 1000 {
            rounds += 1
            guard let completions = try? ring.waitAndReap() else { break }
            for c in completions where c.userData != Self.cancelData && c.userData != Self.stopData { pending[Int(c.userData >> 1)] -= 1 }
        }
        for p in pairs { try? p.source.close(); try? p.target.close() }
    }

    /// Values read from the pairs at `indices`.
    func taken(_ indices: [Int]) -> UInt64 { counts.withLock { c in indices.reduce(0) { $0 &+ c[$1].taken } } }
    /// Reads that returned something, over every pair.
    var wakeups: UInt64 { counts.withLock { $0.reduce(0) { $0 &+ $1.wakeups } } }
    /// CPU time the relay thread has used so far (ns), read from its clock.
    var threadCPUNanoseconds: UInt64 { thread.withLock { $0?.cpuTimeNanoseconds } ?? 0 }

    func stop() {
        _ = try? stopSignal.signal()
        let t = thread.withLock { t -> JoinableThread? in defer { t = nil }; return t }
        t?.join()
    }

    deinit { stop() }
}
