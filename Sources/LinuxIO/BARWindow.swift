import BridgeCore
import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Why the window could not carry out an operation.
public enum BARWindowError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidSize(UInt64)
    case outsideWindow(BusAddress, length: UInt64, windowSize: UInt64)
    case misaligned(BusAddress, length: UInt64, hostPageSize: UInt64)
    case noFileForRegion(RegionID)
    case system(SystemCallError)
    /// Revoking part of the window needed a VMA split the kernel refused
    /// (`vm.max_map_count` reached): the whole window was revoked instead.
    /// Every grant is gone; the caller must drop them all from its model.
    case revokedWholeWindow(SystemCallError)

    public var description: String {
        switch self {
        case .invalidSize(let s): "BAR window size \(Hex(s)) is zero, unaligned or too large"
        case .outsideWindow(let bus, let length, let size):
            "\(bus)+\(Hex(length)) is outside the BAR window (size \(Hex(size)))"
        case .misaligned(let bus, let length, let page):
            "\(bus)+\(Hex(length)) is not aligned to the host page size \(page)"
        case .noFileForRegion(let id): "no file descriptor is known for \(id)"
        case .system(let e): e.description
        case .revokedWholeWindow(let e):
            "\(e) (a revocation may not fail: the whole BAR window was revoked instead, every grant is gone)"
        }
    }
}

/// The BAR in this process's memory. The whole BAR is reserved once
/// (PROT_NONE, MAP_NORESERVE: address space only, no memory committed); ranges
/// are mapped over it with MAP_FIXED | MAP_SHARED from a region's fd, and an
/// unmapped range gets fresh PROT_NONE anonymous memory back, so a hole never
/// shows anything and touching it faults. Every range is MADV_DONTDUMP: VM1's
/// memory never lands in the daemon's core dumps. The window starts on a
/// 1 GiB boundary (hugepage-backed regions).
///
/// Permissions: read-only mappings are PROT_READ. The MMU cannot express
/// write-only, so a write-only IOTLB entry is mapped PROT_READ|PROT_WRITE;
/// checked accessors (`AddressSpace.checkAccess`) still enforce write-only.
///
/// Sendable without `@unchecked`: the state is the immutable base address
/// (kept as an integer) and size, plus a `Locked` that serialises changes so
/// a plan is applied as a unit with respect to other plans.
public final class BARWindow: SharedMemory, Sendable {
    public let size: UInt64
    private let base: UInt
    private let changes = Locked<UInt64>(0)
    public static let hostPageSize = UInt64(shim_page_size())
    /// Where the window starts in this process: on a 1 GiB boundary, so BAR
    /// offsets aligned to a huge page size are host addresses aligned to it.
    public static let alignment: UInt64 = 1 << 30

    public init(size: UInt64) throws(BARWindowError) {
        guard size > 0, size % Self.hostPageSize == 0, size <= UInt64(Int.max) else { throw .invalidSize(size) }
        guard let pointer = shim_reserve(Int(size), Int(Self.alignment)), pointer != shim_map_failed() else {
            throw .system(.current("mmap(reserve \(ByteCount(size)))"))
        }
        self.size = size
        self.base = UInt(bitPattern: pointer)
    }

    deinit {
        if let pointer = UnsafeMutableRawPointer(bitPattern: base) { munmap(pointer, Int(size)) }
    }

    /// Address of BAR offset 0 in this process: internal — the bytes are
    /// reached only through `withBytes` (`SharedMemory`).
    var baseAddress: UnsafeMutableRawPointer {
        // Non-nil: `base` came from a successful mmap.
        UnsafeMutableRawPointer(bitPattern: base).unsafelyUnwrapped
    }

    /// A guard over the whole window: a SIGBUS in it (a mapped file that its
    /// owner truncated) replaces the faulting page with zeros instead of
    /// killing the process (`FaultGuard`). The guard ends with its value.
    public func guardFaults() throws(SystemCallError) -> FaultGuard {
        try FaultGuard(start: baseAddress, length: size)
    }

    /// The BAR offset of a host address inside the window (a guard's
    /// `lastAddress`), or nil.
    public func offset(ofHostAddress address: UInt) -> UInt64? {
        address >= base && UInt64(address - base) < size ? UInt64(address - base) : nil
    }

    /// Number of window syscalls carried out so far (map, protect, revoke).
    public var operationCount: UInt64 { changes.withLock { $0 } }

    private func check(_ bus: BusAddress, _ length: UInt64) throws(BARWindowError) -> UnsafeMutableRawPointer {
        guard length > 0, let end = bus.adding(length), end.rawValue <= size else {
            throw .outsideWindow(bus, length: length, windowSize: size)
        }
        guard bus.rawValue % Self.hostPageSize == 0, length % Self.hostPageSize == 0 else {
            throw .misaligned(bus, length: length, hostPageSize: Self.hostPageSize)
        }
        return baseAddress + Int(bus.rawValue)
    }

    private static func prot(_ permission: Permission) -> Int32 {
        var prot = shim_prot_none()
        if permission.contains(.read) { prot |= shim_prot_read() }
        if permission.contains(.write) { prot |= shim_prot_read() | shim_prot_write() }
        return prot
    }

    private func lockedMap(_ bus: BusAddress, _ length: UInt64, _ permission: Permission, fd: Int32, fdOffset: UInt64) throws(BARWindowError) {
        let address = try check(bus, length)
        guard fdOffset <= UInt64(Int64.max) else { throw .system(SystemCallError("mmap", errno: .invalidArgument)) }
        let result = shim_map_fixed_shared(address, Int(length), Self.prot(permission), fd, off_t(fdOffset))
        guard result == address else {
            throw .system(.current("mmap(\(bus)+\(Hex(length)) fd \(fd)@\(Hex(fdOffset)))"))
        }
    }

    private func lockedProtect(_ bus: BusAddress, _ length: UInt64, _ permission: Permission) throws(BARWindowError) {
        let address = try check(bus, length)
        guard mprotect(address, Int(length), Self.prot(permission)) == 0 else {
            throw .system(.current("mprotect(\(bus)+\(Hex(length)))"))
        }
    }

    /// A revocation may not fail. Revoking part of a mapping splits a VMA,
    /// which the kernel refuses at `vm.max_map_count` (ENOMEM); replacing
    /// the whole window needs no split (it covers whole VMAs and leaves one),
    /// so that is the fallback: less access than asked, never more. If even
    /// that fails, mprotect the whole window PROT_NONE; if that fails too the
    /// process exits, and the kernel drops every mapping with it.
    private func lockedRevoke(_ bus: BusAddress, _ length: UInt64) throws(BARWindowError) {
        // Revoking more than asked is safe, less never: a range not on host
        // pages is widened to whole host pages (inside the window) instead
        // of refused.
        let page = Self.hostPageSize
        let start = bus.rawValue / page * page
        let (rawEnd, overflow) = bus.rawValue.addingReportingOverflow(length)
        // rawEnd < size here, so rounding it up cannot overflow.
        let end = overflow || rawEnd >= size ? size : min(size, (rawEnd / page + (rawEnd % page == 0 ? 0 : 1)) * page)
        guard length > 0, start < end else { throw .outsideWindow(bus, length: length, windowSize: size) }
        let address = try check(BusAddress(start), end - start)
        guard shim_revoke(address, Int(end - start)) != address else { return }
        let failure = SystemCallError.current("mmap(revoke \(BusAddress(start))+\(Hex(end - start)))")
        if shim_revoke(baseAddress, Int(size)) != baseAddress, mprotect(baseAddress, Int(size), shim_prot_none()) != 0 {
            fatalError("vhost-pci-bridged: \(failure), and the whole BAR window could not be revoked either: exiting so the kernel revokes it")
        }
        throw .revokedWholeWindow(failure)
    }

    /// Shows `[fdOffset, fdOffset+length)` of `fd` at BAR offset `bus`.
    public func map(bus: BusAddress, length: UInt64, permission: Permission, fd: Int32, fdOffset: UInt64) throws(BARWindowError) {
        try changes.withLock { (count: inout UInt64) throws(BARWindowError) in
            try lockedMap(bus, length, permission, fd: fd, fdOffset: fdOffset)
            count += 1
        }
    }

    /// Puts PROT_NONE back over `[bus, bus+length)`.
    public func revoke(bus: BusAddress, length: UInt64) throws(BARWindowError) {
        try changes.withLock { (count: inout UInt64) throws(BARWindowError) in
            try lockedRevoke(bus, length)
            count += 1
        }
    }

    /// Carries out a plan from `AddressSpace`. `fileFor` gives the fd backing
    /// a region. If any step fails, every range the plan touches is revoked
    /// (fail closed: less access, never more) and the error is thrown; the
    /// caller should then drop those ranges from its model too.
    public func apply(_ plan: WindowPlan, fileFor: (RegionID) -> Int32?) throws(BARWindowError) {
        try changes.withLock { (count: inout UInt64) throws(BARWindowError) in
            do throws(BARWindowError) {
                for op in plan.operations {
                    switch op {
                    case .map(let bus, let length, let permission, let region, let fdOffset):
                        guard let fd = fileFor(region) else { throw .noFileForRegion(region) }
                        try lockedMap(bus, length, permission, fd: fd, fdOffset: fdOffset)
                    case .protect(let bus, let length, let permission, _, _):
                        try lockedProtect(bus, length, permission)
                    case .unmap(let bus, let length):
                        try lockedRevoke(bus, length)
                    }
                    count += 1
                }
            } catch {
                if case .revokedWholeWindow = error { throw error }
                for op in plan.operations {
                    do throws(BARWindowError) { try lockedRevoke(op.bus, op.length) } catch {
                        if case .revokedWholeWindow = error { throw error } // nothing is left to revoke
                    }
                }
                throw error
            }
        }
    }

    /// Bounds-checked access to `[bus, bus+length)` of the window (against the
    /// window size only: touching an unmapped range still faults, by design).
    public func withBytes<R, E: Error>(at bus: BusAddress, length: Int,
                                       _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R? {
        try withBytes(at: bus.rawValue, length: length, body)
    }

    /// `SharedMemory`: offsets are BAR offsets (bus addresses).
    public func withBytes<R, E: Error>(at offset: UInt64, length: Int,
                                       _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R? {
        guard length >= 0, let end = BusAddress(offset).adding(UInt64(length)), end.rawValue <= size else { return nil }
        return try body(UnsafeMutableRawBufferPointer(start: baseAddress + Int(offset), count: length))
    }

    /// How a probe of one byte ended.
    public enum ProbeResult: Equatable, Sendable {
        case accessible
        case faulted
        /// The child ended some other way, or fork failed (raw wait status / -1).
        case failed(Int32)
    }

    /// Touches one byte at `bus` in a forked child (which only touches memory
    /// and `_exit`s, so it is safe in a threaded process) and reports whether it
    /// faulted. nil when `bus` is outside the window. This is how tests and the
    /// demo prove that a revoked range really faults.
    public func probeInChild(_ bus: BusAddress, write: Bool = false) -> ProbeResult? {
        guard bus.rawValue < size else { return nil }
        let status = shim_fork_touch(baseAddress + Int(bus.rawValue), write ? 1 : 0)
        if status < 0 { return .failed(status) }
        if shim_wifexited(status) != 0 && shim_wexitstatus(status) == 0 { return .accessible }
        if shim_wifsignaled(status) != 0 && shim_wtermsig(status) == SIGSEGV { return .faulted }
        return .failed(status)
    }
}
