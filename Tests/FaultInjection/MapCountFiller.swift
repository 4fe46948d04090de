import CLinuxShim
import LinuxIO
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Fault injection: takes this process's VMAs up to `vm.max_map_count`, so
/// the next mmap, mprotect or munmap that needs a new VMA fails with ENOMEM,
/// exactly as in a daemon at the limit. It reserves address space only
/// (PROT_NONE, no memory) and makes every other page readable, each change
/// splitting the reservation, until the kernel refuses a split.
/// `release()` (or deinit) gives every VMA back. For fault tests run in a
/// process of their own: while it is filled, the process cannot grow either.
public final class MapCountFiller {
    private var base: UInt
    private let length: Int
    /// VMAs added (pages made readable) before the kernel refused one.
    public let splits: Int

    public init() throws(SystemCallError) {
        let page = Int(BARWindow.hostPageSize)
        let pages = 2 * (ResourceLimits.maxMapCount() ?? 65530) + 64
        length = pages * page
        guard let start = shim_reserve(length, page), start != shim_map_failed() else { throw systemCallFailure("mmap(reserve \(pages) pages)") }
        base = UInt(bitPattern: start)
        var splits = 0
        var index = 1
        while index < pages - 1 {
            if mprotect(start + index * page, page, shim_prot_read()) != 0 {
                let failure = systemCallFailure("mprotect(page \(index))")
                guard failure.errno == .noMemory else { munmap(start, length); throw failure }
                self.splits = splits
                return
            }
            splits += 1
            index += 2
        }
        munmap(start, length)
        throw SystemCallError("mprotect: \(pages) pages split without reaching vm.max_map_count", errno: .noMemory)
    }

    /// Unmaps the filler: the process is below the limit again.
    public func release() {
        guard base != 0, let start = UnsafeMutableRawPointer(bitPattern: base) else { return }
        munmap(start, length)
        base = 0
    }

    deinit { release() }
}
