import CLinuxShim

/// How the C allocator (glibc malloc) hands memory back to the kernel.
public enum MemoryAllocator {
    /// The default and fixed size (128 KiB) above which an allocation is its
    /// own mmap, unmapped when freed.
    public static let largeBufferThreshold: Int32 = 128 * 1024

    /// Fixes glibc's mmap threshold at `largeBufferThreshold`. By default
    /// glibc raises the threshold to the size of each large buffer freed (up
    /// to 32 MiB), so the next buffers of that size come from the heap and
    /// stay resident after they are freed. A daemon whose mapping tables grow
    /// and shrink by megabytes keeps that memory for good; with the threshold
    /// fixed it goes back to the kernel at each free (measured in
    /// `vhost-pci-bench scale`: 0.9 MiB less RSS with 100 k mappings).
    /// Returns false when the allocator refused the setting. Call once at
    /// start; an allocator that is not glibc's (a sanitizer's) ignores it.
    @discardableResult
    public static func returnLargeBuffersToTheKernel() -> Bool {
        shim_malloc_fixed_mmap_threshold(largeBufferThreshold) == 1
    }

    /// The arenas `limitArenas()` allows, the main one included.
    public static let arenas: Int32 = 2

    /// Limits glibc malloc to `arenas` arenas (M_ARENA_MAX) unless the
    /// environment already chose (MALLOC_ARENA_MAX, or glibc.malloc.arena_max
    /// in GLIBC_TUNABLES). glibc gives threads
    /// arenas of their own, up to 8 per CPU, and each keeps the pages its
    /// thread touched (about 40 KiB each in the daemon, idle): with three
    /// threads per bridge, 16 bridges held 14 arenas. The daemon's threads
    /// allocate little and rarely at once, and glibc's per-thread cache
    /// serves small blocks without the arena's lock. Returns false when the
    /// allocator refused the setting or the environment set it. Call once at
    /// start, before any thread.
    @discardableResult
    public static func limitArenas(environment: [String: String]) -> Bool {
        guard environment["MALLOC_ARENA_MAX"] == nil,
              !(environment["GLIBC_TUNABLES"] ?? "").contains("glibc.malloc.arena_max") else { return false }
        return shim_malloc_arena_max(arenas) == 1
    }
}
