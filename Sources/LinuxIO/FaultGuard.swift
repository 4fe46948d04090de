import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// Keeps a SIGBUS in `[start, start+length)` from killing the process: the
/// faulting page is replaced with private zero-filled memory and the access
/// retried (see `shim_guard_add`). For shared mappings of files another
/// process can truncate (VM1's unsealed memory in VM2's BAR): the device
/// reads zeros instead of dying, and learns of it from `trips`.
/// At most `SHIM_GUARD_SLOTS` (64) guards in a process.
public final class FaultGuard: Sendable {
    private let slot: Int32

    public init(start: UnsafeMutableRawPointer, length: UInt64) throws(SystemCallError) {
        let slot = shim_guard_add(start, Int(length))
        guard slot >= 0 else { throw .current("sigaction(SIGBUS) / fault guard slot") }
        self.slot = slot
    }

    deinit { shim_guard_remove(slot) }

    /// Faults absorbed so far.
    public var trips: UInt64 { shim_guard_trips(slot) }
    /// Where the last absorbed fault was.
    public var lastAddress: UInt { UInt(shim_guard_last_address(slot)) }
}
