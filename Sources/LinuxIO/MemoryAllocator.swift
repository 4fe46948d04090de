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
}
