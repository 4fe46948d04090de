import BridgeCore
import LinuxIO

/// Why an access the device needed was not possible.
public enum AccessFault: Error, Equatable, Sendable, CustomStringConvertible {
    /// Not granted (yet): a translation may make it accessible.
    case missing(address: UInt64, length: UInt64, access: Permission)
    /// Never accessible: outside the BAR, or wrapping around.
    case outside(address: UInt64, length: UInt64)
    /// In unsealed memory (MAP's unsealed flag) after VM1 truncated memory
    /// under the BAR: the device no longer touches it (a translation would
    /// not help).
    case truncated(address: UInt64, length: UInt64)

    public var description: String {
        switch self {
        case .missing(let a, let l, let p): "\(Hex(a))+\(Hex(l)) is not granted \(p)"
        case .outside(let a, let l): "\(Hex(a))+\(Hex(l)) is outside the BAR"
        case .truncated(let a, let l): "\(Hex(a))+\(Hex(l)) is in unsealed memory VM1 truncated"
        }
    }
}

/// VM2's BAR and what is granted in it: the one owner of both. The data
/// path reaches the bytes only inside `burst`, so no pointer outlives a
/// burst, and grants change (revocations are applied) only between bursts —
/// never under a packet being read. A value type: the one `NetDevice` (or
/// device thread) that holds it is its owner.
///
/// Unsealed memory (MAP's unsealed flag, peer feature `unsealedMaps`) can be
/// truncated by VM1 at any time, and touching it afterwards is a SIGBUS. The
/// first unsealed grant puts a `FaultGuard` over the whole BAR: such a fault
/// replaces the page with zeros and the access goes on; after the burst,
/// every unsealed grant (and the grant the fault hit) is withdrawn, and from
/// then on descriptors in them are refused (`ChainRefusal.truncated`),
/// rings in them disable their queue, and later unsealed MAPs are mapped
/// but never used. The device reads zeros for at most the rest of the burst
/// in which VM1 truncated its memory; it never dies of it.
public struct DeviceMemory {
    public private(set) var window: BARWindow?
    public private(set) var grants: GrantTable
    /// Unsealed ranges now granted.
    private var unsealed = PeerMappingTable()
    /// Unsealed ranges withdrawn after a truncation (refused, never touched).
    private var lost = PeerMappingTable()
    private var faultGuard: FaultGuard?
    private var tripsSeen: UInt64 = 0
    /// VM1 truncated memory under the BAR: unsealed MAPs are not used any more.
    public private(set) var distrustsUnsealed = false
    /// SIGBUS faults absorbed (each replaced a page with zeros).
    public private(set) var faultsAbsorbed: UInt64 = 0
    /// Dirty logging (VM1 live-migrates), from the first log on: one
    /// reference, so a device that never logs carries one word for it.
    private var logState: DirtyLogState?

    /// VM1's dirty log while it live-migrates (peer feature `dirtyLog`):
    /// every write the device makes into VM1's memory is marked in it.
    public var dirtyLog: DirtyLogMemory? { logState?.memory }
    /// Writes made while logging that could not be marked: the range's
    /// guest-physical address was not known, or it lies past the log.
    public var unloggedWrites: UInt64 { logState?.unlogged ?? 0 }
    /// Writes marked in the dirty log (each one or more pages).
    public var loggedWrites: UInt64 { logState?.logged ?? 0 }

    /// From the next burst on every write is marked in `log` (nil: none is).
    public mutating func setDirtyLog(_ log: DirtyLogMemory?) {
        if let logState {
            logState.memory = log
        } else if let log {
            logState = DirtyLogState(log)
        }
    }

    public init() { grants = GrantTable(barSize: 0) }

    /// The BAR the daemon described (HELLO reply); forgets every grant.
    public mutating func attach(_ window: BARWindow) {
        forgetUnsealed()
        self.window = window
        grants = GrantTable(barSize: window.size, generation: grants.generation &+ 1)
    }

    public mutating func detach() {
        forgetUnsealed() // the guard goes before the window it covers
        window = nil
        grants = GrantTable(barSize: 0, generation: grants.generation &+ 1)
    }

    private mutating func forgetUnsealed() {
        faultGuard = nil
        tripsSeen = 0
        unsealed = PeerMappingTable()
        lost = PeerMappingTable()
        distrustsUnsealed = false
    }

    public var barSize: UInt64 { grants.barSize }

    /// Maps `[bus, bus+length)` of `fd` at `fdOffset` into the BAR and
    /// records the grant. `unsealed`: MAP's flag (VM1 can truncate the file).
    /// `guestPhysical`: VM1's guest-physical address of the range's first
    /// byte, where the dirty log marks writes into it (MAP, `dirtyLog`).
    public mutating func map(bus: UInt64, length: UInt64, permission: Permission, fd: Int32, fdOffset: UInt64,
                             unsealed isUnsealed: Bool = false, guestPhysical: UInt64? = nil) throws(BARWindowError) {
        guard let window else { throw .invalidSize(0) }
        if isUnsealed, faultGuard == nil {
            do { faultGuard = try window.guardFaults() } catch { throw .system(error) } // unguarded: not mapped at all
            tripsSeen = 0
        }
        try window.map(bus: BusAddress(bus), length: length, permission: permission, fd: fd, fdOffset: fdOffset)
        guard isUnsealed else {
            unsealed.remove(bus, bus + length)
            lost.remove(bus, bus + length)
            grants.grant(bus, bus + length, permission, guestPhysical: guestPhysical)
            return
        }
        if distrustsUnsealed {
            grants.revoke(bus, bus + length)
            lost.add(bus, bus + length, permission)
        } else {
            lost.remove(bus, bus + length)
            unsealed.add(bus, bus + length, permission)
            grants.grant(bus, bus + length, permission, guestPhysical: guestPhysical)
        }
    }

    /// Forgets `[bus, bus+length)` first (from here on the device refuses
    /// it), then revokes it in the BAR. Never refused: if the kernel could
    /// only revoke the whole window (`vm.max_map_count`), every grant is
    /// forgotten with it, and later accesses fault as refused chains.
    public mutating func unmap(bus: UInt64, length: UInt64) {
        let (end, overflow) = bus.addingReportingOverflow(length)
        grants.revoke(bus, overflow ? UInt64.max : end)
        unsealed.remove(bus, overflow ? UInt64.max : end)
        lost.remove(bus, overflow ? UInt64.max : end)
        do { try window?.revoke(bus: BusAddress(bus), length: length) } catch {
            if case .revokedWholeWindow = error { grants = GrantTable(barSize: grants.barSize, generation: grants.generation &+ 1) }
        }
    }

    /// Runs `body` with checked access to the BAR; nil before the BAR exists.
    public mutating func burst<R>(_ body: (inout BurstAccess) -> R) -> R? {
        guard let window else { return nil }
        let granted = grants, lost = lost
        var kept: GrantTable? = nil
        guard let state = logState, let log = state.memory else {
            let result: R? = window.withBytes(at: 0, length: Int(window.size)) { bar in
                var access = BurstAccess(bar: bar, grants: granted, lost: lost)
                defer { kept = access.grants }
                return body(&access)
            }
            if let kept { grants = kept }
            noteTruncations()
            return result
        }
        let result: R? = window.withBytes(at: 0, length: Int(window.size)) { bar in
            var access = BurstAccess(bar: bar, grants: granted, lost: lost, log: (log.bytes, log.size))
            swap(&state.cache, &access.logCache) // moved, not shared: no copy on write
            defer {
                access.flushLog() // no mark outlives its burst
                kept = access.grants
                state.logged &+= access.loggedWrites
                state.unlogged &+= access.unloggedWrites
                swap(&state.cache, &access.logCache)
            }
            return withExtendedLifetime(log) { body(&access) }
        }
        if let kept { grants = kept }
        noteTruncations()
        return result
    }

    /// After a burst: a fault the guard absorbed means VM1 truncated memory
    /// under the BAR. Every unsealed grant, and the one the fault hit, is
    /// withdrawn (refused from now on, never touched again).
    public mutating func noteTruncations() {
        guard let faultGuard, let window else { return }
        let trips = faultGuard.trips
        guard trips != tripsSeen else { return }
        faultsAbsorbed &+= trips &- tripsSeen
        tripsSeen = trips
        distrustsUnsealed = true
        var withdrawn = unsealed.ranges
        if let at = window.offset(ofHostAddress: faultGuard.lastAddress), let hit = grants.table.range(containing: at) {
            withdrawn.append(hit)
        }
        for r in withdrawn {
            grants.revoke(r.start, r.end)
            lost.add(r.start, r.end, r.permission)
        }
        unsealed = PeerMappingTable()
    }
}

/// A device's dirty logging: the log it writes now (nil: none), what its
/// bursts did with it, and their mark cache (kept so a burst allocates
/// nothing). A class so that `DeviceMemory`, which a burst moves in and out
/// of its owner, grows by one word for it; it belongs to that one
/// `DeviceMemory` (and so to one device thread).
final class DirtyLogState {
    var memory: DirtyLogMemory?
    var logged: UInt64 = 0
    var unlogged: UInt64 = 0
    var cache: [DirtyLogWord]

    init(_ memory: DirtyLogMemory) {
        self.memory = memory
        cache = Array(repeating: DirtyLogWord(word: DirtyLogWord.none, bits: 0), count: DirtyLogWord.cacheCapacity)
    }
}

/// 64 pages of the dirty log (one of its u64 words) and the bits a burst
/// marked in it.
public struct DirtyLogWord: Sendable, Equatable {
    public var word: UInt64
    public var bits: UInt64
    /// Words reserved for a burst's marks.
    static let cacheCapacity = 32
    /// No word.
    static let none = UInt64.max
}

/// Checked access to the BAR during one burst. Every buffer a descriptor
/// names goes through `part`, which checks the grant (last-hit first) and
/// the BAR's bounds; ring fields are reached through `ring…` accessors only
/// after `DeviceQueue` checked the ring's areas for this grant generation.
/// Non-copyable, made only by `DeviceMemory.burst` and lent as `inout`: the
/// BAR pointer it holds cannot leave the burst.
public struct BurstAccess: ~Copyable {
    let bar: UnsafeMutableRawBufferPointer
    var grants: GrantTable
    /// Unsealed memory withdrawn after a truncation (refused as `.truncated`).
    let lost: PeerMappingTable
    /// VM1's dirty log (its bytes and size) while it live-migrates.
    let log: (bytes: UnsafeMutableRawPointer, size: UInt64)?
    var loggedWrites: UInt64 = 0
    var unloggedWrites: UInt64 = 0
    /// Marks of this burst not in the log yet, as 64-page words (the log's
    /// own u64 chunks): a burst's writes land on few pages, each marked
    /// once per flush with one atomic OR. The word being marked is kept
    /// apart (`logWord`, `logBits`), the others in `logCache`.
    var logCache: [DirtyLogWord]
    /// Words of `logCache` in use.
    var logCached = 0
    var logWord = DirtyLogWord.none
    var logBits: UInt64 = 0
    /// The grant the last logged write was in (`[start, end)`, and what
    /// turns its BAR offsets into guest-physical addresses); empty at first.
    var logRangeStart: UInt64 = 1, logRangeEnd: UInt64 = 0, logRangeDelta: UInt64 = 0

    init(bar: UnsafeMutableRawBufferPointer, grants: GrantTable, lost: PeerMappingTable = PeerMappingTable(),
         log: (bytes: UnsafeMutableRawPointer, size: UInt64)? = nil) {
        self.bar = bar
        self.grants = grants
        self.lost = lost
        self.log = log
        self.logCache = []
    }

    /// Whether writes are being logged (VM1 live-migrates).
    public var logging: Bool { log != nil }

    /// Marks `[address, address+length)` of the BAR — just written by the
    /// device — for VM1's dirty log, by guest-physical page (a write that
    /// spans grants is marked piece by piece). The marks reach the log at
    /// the next `flushLog` (when the used index is published, and at the
    /// end of the burst at the latest). Costs one test when VM1 is not
    /// migrating.
    @inline(__always)
    public mutating func logWrite(_ address: UInt64, _ length: Int) {
        guard let log, length > 0 else { return }
        let n = UInt64(length)
        // Most writes of a burst land in the grant the one before did.
        if address >= logRangeStart, address < logRangeEnd, n <= logRangeEnd - address {
            let gpa = address &+ logRangeDelta
            var page = gpa >> DirtyLog.pageShift
            let last = (gpa &+ (n - 1)) >> DirtyLog.pageShift
            if last >> 3 < log.size {
                while true {
                    markPage(page)
                    if page >= last { break }
                    page += 1
                }
                loggedWrites &+= 1
                return
            }
        }
        logWrite(address, n, logSize: log.size)
    }

    private mutating func logWrite(_ address: UInt64, _ length: UInt64, logSize: UInt64) {
        var at = address, left = length
        var recorded = true
        while left > 0 {
            guard let range = grants.range(containing: at) else {
                recorded = false // not granted: never written (the write was checked)
                break
            }
            let n = min(left, range.end - at)
            guard let delta = range.guestPhysicalDelta else {
                recorded = false // where this piece is in VM1 is not known: the next may be
                at += n
                left -= n
                continue
            }
            (logRangeStart, logRangeEnd, logRangeDelta) = (range.start, range.end, delta)
            let gpa = at &+ delta
            // Granted ranges never wrap (MAP's address is checked), so
            // neither does a piece of one.
            var page = gpa >> DirtyLog.pageShift
            let last = (gpa &+ (n - 1)) >> DirtyLog.pageShift
            while true {
                guard page >> 3 < logSize else { recorded = false; break }
                markPage(page)
                if page >= last { break }
                page += 1
            }
            at += n
            left -= n
        }
        if recorded { loggedWrites &+= 1 } else { unloggedWrites &+= 1 }
    }

    /// One page's bit, into the word being marked (most writes of a burst
    /// land in the one before).
    @inline(__always)
    private mutating func markPage(_ page: UInt64) {
        let word = page >> 6
        if word != logWord { switchWord(word) }
        logBits |= UInt64(1) << (page & 63)
    }

    private mutating func switchWord(_ word: UInt64) {
        if logWord != DirtyLogWord.none {
            let done = DirtyLogWord(word: logWord, bits: logBits)
            if let i = logCache.prefix(logCached).firstIndex(where: { $0.word == done.word }) {
                logCache[i].bits |= done.bits
            } else if logCached < logCache.count {
                logCache[logCached] = done
                logCached += 1
            } else {
                logCache.append(done) // past the reserved words: grows once, kept
                logCached += 1
            }
        }
        logWord = word
        logBits = 0
    }

    /// Puts this burst's marks into the log (atomic ORs after the writes
    /// they record: release). Marks reach the log only here — when the used
    /// index is published, and at the end of the burst — so every write of
    /// the burst before it (the `num_buffers` a frame sets last included)
    /// is in memory before its bit.
    public mutating func flushLog() {
        guard let log else { return }
        if logWord != DirtyLogWord.none {
            DirtyLogMemory.or(log.bytes, size: log.size, word: logWord, bits: logBits)
            logWord = DirtyLogWord.none
            logBits = 0
        }
        for i in 0..<logCached { DirtyLogMemory.or(log.bytes, size: log.size, word: logCache[i].word, bits: logCache[i].bits) }
        logCached = 0
    }

    /// Marks the first `count` bytes of `segments` (a chain just filled).
    @inline(__always)
    mutating func logWrite(_ segments: Segments, bytes count: Int) {
        guard log != nil else { return }
        var left = count
        for part in segments.parts where left > 0 {
            let n = min(left, part.count)
            logWrite(UInt64(part.offset), n)
            left -= n
        }
    }

    /// Marks the used ring (its elements, flags, index and `avail_event`)
    /// and puts every mark of the burst into the log: before the used index
    /// publishes what the marks record, and again right after it (the
    /// index's own write must come before its mark).
    @inline(__always)
    mutating func logUsedRing(_ ring: SplitRing, eventIndex: Bool) {
        guard log != nil else { return }
        logWrite(ring.used, Int(ring.usedBytes(eventIndex: eventIndex)))
        flushLog()
    }

    public var generation: UInt64 { grants.generation }

    /// `[address, address+length)` when granted with `needed`, else the fault.
    @inline(__always)
    public mutating func part(_ address: UInt64, _ length: UInt32, _ needed: Permission) -> Result<Segments.Part, AccessFault> {
        let n = UInt64(length)
        switch grants.check(address, n, needed) {
        case nil:
            // Granted implies inside the BAR (grants never exceed it).
            return .success(Segments.Part(offset: Int(address), count: Int(length)))
        case .notMapped?, .denied?:
            if lost.touches(address, n) { return .failure(.truncated(address: address, length: n)) }
            return .failure(.missing(address: address, length: n, access: needed))
        case .wraps?, .outsideBAR?:
            return .failure(.outside(address: address, length: n))
        }
    }

    /// Copies `[address, address + buffer.count)` out of the BAR when it is
    /// granted for reading; otherwise the fault, and nothing is copied.
    public mutating func copy(from address: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> AccessFault? {
        guard let length = UInt32(exactly: buffer.count) else { return .outside(address: address, length: UInt64(buffer.count)) }
        switch part(address, length, .read) {
        case .failure(let fault):
            return fault
        case .success(let p):
            if p.count > 0, let to = buffer.baseAddress, let from = bar.baseAddress { to.copyMemory(from: from + p.offset, byteCount: p.count) }
            return nil
        }
    }

    /// Whether a ring area is granted; not cached (see `GrantTable.checkOnce`).
    func areaFault(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> AccessFault? {
        switch grants.checkOnce(address, length, needed) {
        case nil: nil
        case .notMapped?, .denied?: lost.touches(address, length) ? .truncated(address: address, length: length)
            : .missing(address: address, length: length, access: needed)
        case .wraps?, .outsideBAR?: .outside(address: address, length: length)
        }
    }

    // Ring fields: only for areas checked in this grant generation.
    @inline(__always) func loadAcquire(_ offset: UInt64) -> UInt16 {
        RingOrdering.loadAcquire(UnsafeRawPointer(bar.baseAddress.unsafelyUnwrapped + Int(offset)))
    }
    @inline(__always) func storeRelease(_ value: UInt16, _ offset: UInt64) {
        RingOrdering.storeRelease(value, bar.baseAddress.unsafelyUnwrapped + Int(offset))
    }
    @inline(__always) func load<T: FixedWidthInteger>(_: T.Type, _ offset: UInt64) -> T {
        T(littleEndian: bar.loadUnaligned(fromByteOffset: Int(offset), as: T.self))
    }
    @inline(__always) func store<T: FixedWidthInteger>(_ value: T, _ offset: UInt64) {
        bar.storeBytes(of: value.littleEndian, toByteOffset: Int(offset), as: T.self)
    }
    /// Descriptor `index` of `ring`, decoded once.
    @inline(__always) func descriptor(_ ring: SplitRing, _ index: UInt16) -> Descriptor {
        Descriptor(unchecked: UnsafeRawPointer(bar.baseAddress.unsafelyUnwrapped + Int(ring.descriptor(index))))
    }
}
