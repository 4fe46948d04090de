import BridgeCore

/// Dirty-page logging for VM1's live migration (VHOST_F_LOG_ALL,
/// VHOST_USER_PROTOCOL_F_LOG_SHMFD). The bridge writes nothing into VM1's
/// memory itself: VM2's device does, so VM2 logs (peer feature `dirtyLog`)
/// and the session only decides — which log, on or off — as effects.
public struct LoggingState: Equatable, Sendable {
    /// The log of the last SET_LOG_BASE that was accepted (its fd is the
    /// connection's); nil before one, after a refused one, and once
    /// logging stopped.
    public internal(set) var area: DirtyLogArea?
    /// Why the last SET_LOG_BASE was refused (LOG_ALL then fails with it).
    public internal(set) var refusal: String?
    /// VHOST_F_LOG_ALL is acked: the device logs every write it makes.
    public internal(set) var on = false
    public init() {}
}

extension BackendSession {
    /// SET_LOG_BASE's answer: a header with no payload (what QEMU reads
    /// back with LOG_SHMFD, and what DPDK sends).
    static let logBaseReply = VhostUserCodec.encodeReply(to: .setLogBase, .empty)

    /// SET_LOG_BASE: checks the log (a regular file sealed against
    /// shrinking, the area inside it, large enough for the memory table)
    /// and takes it. While logging is on the device switches to it before
    /// VM1 is answered (VM1 syncs and frees the old log after the answer).
    mutating func setLogBase(_ log: LogArea, files: [ReceivedFile]) throws(SessionError) -> [SessionEffect] {
        let code = RequestCode.setLogBase
        try requireOwner(code)
        try requireProtocol(code, .logShmfd)
        guard let file = files.first else { throw .dirtyLog(code, reason: "no log fd came with it") }
        guard file.kind == .regularFile else { throw .wrongFileKind(code, vring: nil, got: file.kind, needed: .regularFile) }
        guard file.sealedAgainstShrinking else {
            throw .dirtyLog(code, reason: "the log file is not sealed against shrinking (F_SEAL_SHRINK): a truncation would fault the device that writes it")
        }
        let area: DirtyLogArea
        do { area = try DirtyLogArea(size: log.size, offset: log.offset, fileSize: file.size, covering: regions) } catch {
            throw .dirtyLog(code, reason: error.description)
        }
        logging.area = area
        logging.refusal = nil
        var effects: [SessionEffect] = [.adoptLogFile(fdIndex: file.index, area)]
        if logging.on {
            // The device must not keep writing a log VM1 frees after this
            // answer (or, with the log pending, must start logging before
            // its rings run).
            effects.append(.deviceLog(area, reply: Self.logBaseReply, refusal: nil))
        } else {
            effects.append(.reply(Self.logBaseReply))
        }
        return effects
    }

    /// A refused SET_LOG_BASE is still answered (VM1 waits for it), and the
    /// old log is dropped with it: LOG_ALL then fails, naming `error`. While
    /// logging is on, the device could only go on writing a log VM1 frees:
    /// the connection closes (nothing more is written into VM1's memory).
    mutating func refusedLogBase(_ error: SessionError) -> Outcome {
        logging.refusal = error.description
        logging.area = nil
        if logging.on {
            return Outcome(effects: [.deviceLog(nil, reply: nil, refusal: nil), .releaseLogFile], error: error, closeConnection: true)
        }
        return Outcome(effects: [.releaseLogFile, .reply(Self.logBaseReply)], error: error, closeConnection: false)
    }

    /// SET_FEATURES turning VHOST_F_LOG_ALL on or off: the device starts
    /// logging into the log SET_LOG_BASE gave, or stops and the log is let
    /// go. Without a log yet the log is pending: QEMU starts a device
    /// during a migration with LOG_ALL first and SET_LOG_BASE after its
    /// rings — the rings then wait for the log (`logPending`). Refused
    /// after a refused log, without LOG_SHMFD, or with a log too small for
    /// the memory table.
    mutating func loggingChange(to features: UInt64) throws(SessionError) -> [SessionEffect] {
        let wanted = features & FeatureBit.vhostLogAll != 0
        guard wanted != logging.on else { return [] }
        guard wanted else {
            logging.area = nil
            return [.deviceLog(nil, reply: nil, refusal: nil), .releaseLogFile]
        }
        guard ackedProtocolFeatures.contains(.logShmfd) else {
            throw .dirtyLog(.setFeatures, reason: "VHOST_F_LOG_ALL needs protocol feature LOG_SHMFD (the log in shared memory), which was not negotiated")
        }
        if let refusal = logging.refusal {
            throw .dirtyLog(.setFeatures, reason: "VHOST_F_LOG_ALL needs a log: the last SET_LOG_BASE was refused: \(refusal)")
        }
        guard let area = logging.area else { return [.awaitLog(reply: nil, refusal: nil)] }
        do { try DirtyLogArea.check(size: area.size, covers: regions) } catch {
            throw .dirtyLog(.setFeatures, reason: "VHOST_F_LOG_ALL: \(error)")
        }
        return [.deviceLog(area, reply: nil, refusal: nil)]
    }

    /// Logging is on and its log has not come yet: rings wait for it.
    public var logPending: Bool { logging.on && logging.area == nil }

    /// The device could not start logging (VM2 cannot log, or failed to map
    /// the log): LOG_ALL is not in force, VM1 was refused.
    public mutating func deviceLogFailed(_ reason: String) {
        logging.on = false
        logging.area = nil
        if let acked = ackedFeatures { ackedFeatures = acked & ~FeatureBit.vhostLogAll }
        statistics.refusals["dirty-log", default: 0] += 1
    }

    /// A memory table change while logging: the log must cover the new
    /// table (VM1 grows its log first; QEMU does).
    func requireLogCovers(_ descriptors: [RegionDescriptor], adding: Bool, code: RequestCode) throws(SessionError) {
        guard logging.on, let area = logging.area else { return }
        var end: UInt64 = 0
        for d in descriptors { end = max(end, d.guestPhysical.adding(d.size)?.rawValue ?? UInt64.max) }
        if adding { for r in regions.regions { end = max(end, r.guestPhysical.adding(r.size)?.rawValue ?? UInt64.max) } }
        let needed = end == UInt64.max ? UInt64.max : DirtyLog.bytesNeeded(toCover: end)
        guard area.size >= needed else {
            throw .dirtyLog(code, reason: "logging is on and the log (\(area.size) bytes) does not cover the new memory table (\(needed) bytes needed)")
        }
    }

    /// VHOST_VRING_F_LOG: used-ring writes are logged at `log`. The device
    /// logs the used ring by its own guest-physical address, so `log` must
    /// be that address (QEMU and DPDK send exactly it): in iommu mode the
    /// used ring's IOVA, without a vIOMMU its guest-physical address.
    func checkLogAddress(_ address: VringAddress, index: Int) throws(SessionError) {
        guard address.flags & VringAddress.flagLog != 0 else { return }
        let used: UInt64?
        if iommuPlatform {
            used = address.used
        } else {
            used = regions.guestPhysical(ofUser: FrontendUserAddress(address.used), length: 1)?.rawValue
        }
        guard let used else {
            throw .dirtyLog(.setVringAddr, reason: "vring \(index): the used ring \(Hex(address.used)) is not in VM1's memory table, so its log address cannot be checked")
        }
        guard used == address.log else {
            throw .dirtyLog(.setVringAddr, reason: "vring \(index): log address \(Hex(address.log)) is not the used ring's own (\(Hex(used))); the device logs the used ring where it is")
        }
    }
}
