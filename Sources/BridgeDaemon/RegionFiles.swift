import BridgeCore
import LinuxIO
import Logging

/// The memory fds VM1 sent, one per region, owned here until the region
/// goes: whether each is sealed against shrinking (so reading it cannot
/// SIGBUS the daemon or VM2), and its read-only reopening, made on the first
/// read-only grant. Used by the bridge thread only.
///
/// A read-only fd only protects while nobody can reopen the file read-write
/// through `/proc/self/fd`: a memfd is created mode 0777, so on adoption a
/// file without a name (memfd, unlinked file: nobody opens it by a path)
/// loses its group and other write bits. A read-only grant then holds
/// against a VM2 VMM of another uid than the file's owner, without
/// CAP_DAC_OVERRIDE or CAP_FOWNER; against one of the owner's uid, or root,
/// nothing can (it may change the mode back). Named files keep their mode:
/// they belong to VM1's owner, and whoever may open them by name does not
/// need the fd.
final class RegionFiles {
    private var files: [RegionID: OwnedFileDescriptor] = [:]
    private var sealed: [RegionID: Bool] = [:]
    /// A read grant travels with an fd that cannot be mapped writable.
    private var readOnlyFiles: [RegionID: OwnedFileDescriptor] = [:]
    /// Unsealed regions whose withholding from VM2 was logged.
    private var withheldLogged: Set<RegionID> = []
    /// Where each region is in VM1's guest-physical memory (the dirty log
    /// is by guest-physical page): its address and the fd offset it starts at.
    private var placement: [RegionID: (guestPhysical: UInt64, mmapOffset: UInt64, size: UInt64)] = [:]
    /// The dirty log VM1 handed over (SET_LOG_BASE), while it is held.
    private(set) var log: (fd: OwnedFileDescriptor, area: DirtyLogArea)?
    private let logger: Logger

    init(logger: Logger) { self.logger = logger }

    func adopt(_ id: RegionID, _ fd: OwnedFileDescriptor, region: MemoryRegion? = nil) {
        files[id] = fd
        if let region { placement[id] = (region.guestPhysical.rawValue, region.mmapOffset, region.size) }
        sealed[id] = (try? Memfd(adopting: fd).seals.contains(.shrink)) ?? false
        tightenMode(id, fd)
    }

    /// Group and other write bits off a file without a name (see above).
    private func tightenMode(_ id: RegionID, _ fd: OwnedFileDescriptor) {
        guard let file = try? fd.ownership() else { return }
        let othersWrite: UInt32 = 0o022
        guard file.mode & othersWrite != 0 else { return }
        guard file.links == 0 else {
            logger.notice("\(id): its file has a name and mode \(String(file.mode, radix: 8)) (left as VM1's owner set it): read-only grants of it do not hold against a VM2 VMM that may open it by name")
            return
        }
        do {
            try fd.changeMode(to: file.mode & ~othersWrite)
        } catch {
            logger.warning("\(id): cannot take group/other write off its file (mode \(String(file.mode, radix: 8)), owner uid \(file.uid)): read-only grants of it do not hold against a VM2 VMM of any uid: \(error)")
        }
    }

    func fd(_ id: RegionID) -> OwnedFileDescriptor? { files[id] }
    /// Every fd held for `id` (its file, and a read-only one if made).
    func held(_ id: RegionID) -> [OwnedFileDescriptor] { [files[id], readOnlyFiles[id]].compactMap { $0 } }
    func isSealed(_ id: RegionID) -> Bool { sealed[id] == true }

    /// True the first time it is asked for `id` (while the region lives):
    /// a withheld region is logged once.
    func firstWithheld(_ id: RegionID) -> Bool { withheldLogged.insert(id).inserted }

    /// The read-only fd of `id`, reopened once. Where Linux refuses the
    /// reopen there is none (nil): the grant is not sent (see PeerMirror).
    func readOnly(_ id: RegionID) -> OwnedFileDescriptor? {
        if let fd = readOnlyFiles[id] { return fd }
        guard let file = files[id] else { return nil }
        do {
            let fd = try file.reopenReadOnly()
            readOnlyFiles[id] = fd
            return fd
        } catch {
            logger.error("\(id): cannot reopen its file read-only, read-only grants of it are not sent to VM2: \(error)")
            return nil
        }
    }

    /// The guest-physical address of byte `fdOffset` of `id`'s file (nil:
    /// not inside the region, or the region is unknown).
    func guestPhysical(_ id: RegionID, fdOffset: UInt64) -> UInt64? {
        guard let p = placement[id], fdOffset >= p.mmapOffset, fdOffset - p.mmapOffset < p.size else { return nil }
        return p.guestPhysical.addingReportingOverflow(fdOffset - p.mmapOffset).overflow ? nil : p.guestPhysical + (fdOffset - p.mmapOffset)
    }

    /// Holds `fd` as the dirty log (the previous one is closed).
    func adoptLog(_ fd: OwnedFileDescriptor, _ area: DirtyLogArea) {
        releaseLog()
        log = (fd, area)
    }

    func releaseLog() {
        try? log?.fd.close()
        log = nil
    }

    func release(_ id: RegionID) {
        placement[id] = nil
        try? files.removeValue(forKey: id)?.close()
        try? readOnlyFiles.removeValue(forKey: id)?.close()
        sealed[id] = nil
        withheldLogged.remove(id)
    }

    func closeAll() {
        releaseLog()
        for id in Array(files.keys) { release(id) }
        for fd in readOnlyFiles.values { try? fd.close() }
        readOnlyFiles = [:]
    }
}
