import BridgeCore
import LinuxIO
import Logging

/// The memory fds VM1 sent, one per region, owned here until the region
/// goes: whether each is sealed against shrinking (so reading it cannot
/// SIGBUS the daemon), and its read-only reopening, made on the first
/// read-only grant. Used by the bridge thread only.
final class RegionFiles {
    private var files: [RegionID: OwnedFileDescriptor] = [:]
    private var sealed: [RegionID: Bool] = [:]
    /// A read grant travels with an fd that cannot be mapped writable.
    private var readOnlyFiles: [RegionID: OwnedFileDescriptor] = [:]
    private let logger: Logger

    init(logger: Logger) { self.logger = logger }

    func adopt(_ id: RegionID, _ fd: OwnedFileDescriptor) {
        files[id] = fd
        sealed[id] = (try? Memfd(adopting: fd).seals.contains(.shrink)) ?? false
    }

    func fd(_ id: RegionID) -> OwnedFileDescriptor? { files[id] }
    func isSealed(_ id: RegionID) -> Bool { sealed[id] == true }

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

    func release(_ id: RegionID) {
        try? files.removeValue(forKey: id)?.close()
        try? readOnlyFiles.removeValue(forKey: id)?.close()
        sealed[id] = nil
    }

    func closeAll() {
        for id in Array(files.keys) { release(id) }
        for fd in readOnlyFiles.values { try? fd.close() }
        readOnlyFiles = [:]
    }
}
