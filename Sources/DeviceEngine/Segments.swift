/// The buffers of one descriptor chain, as checked views into the BAR, valid
/// for the burst that produced them. Reused from chain to chain (its storage
/// is kept), so serving a packet allocates nothing.
public struct Segments {
    public private(set) var parts: [UnsafeMutableRawBufferPointer] = []
    public private(set) var totalLength = 0

    public init() { parts.reserveCapacity(16) }

    /// A view of one contiguous buffer (a frame the device made itself).
    public init(_ bytes: UnsafeRawBufferPointer) {
        self.init()
        append(UnsafeMutableRawBufferPointer(mutating: bytes))
    }

    public mutating func removeAll() {
        parts.removeAll(keepingCapacity: true)
        totalLength = 0
    }

    mutating func append(_ part: UnsafeMutableRawBufferPointer) {
        parts.append(part)
        totalLength += part.count
    }

    /// Copies from `source` (starting `sourceOffset` bytes into it) into
    /// these buffers, as much as fits; returns the bytes copied.
    func fill(from source: Segments, sourceOffset: Int) -> Int {
        var copied = 0
        var s = 0, sOffset = sourceOffset
        // Find the source part holding `sourceOffset`.
        while s < source.parts.count, sOffset >= source.parts[s].count { sOffset -= source.parts[s].count; s += 1 }
        for dest in parts {
            var dOffset = 0
            while dOffset < dest.count, s < source.parts.count {
                let src = source.parts[s]
                let n = min(dest.count - dOffset, src.count - sOffset)
                if n > 0, let to = dest.baseAddress, let from = src.baseAddress {
                    (to + dOffset).copyMemory(from: from + sOffset, byteCount: n)
                }
                dOffset += n; sOffset += n; copied += n
                if sOffset == src.count { s += 1; sOffset = 0 }
            }
            if s == source.parts.count { break }
        }
        return copied
    }

    /// `body` with the whole chain as one buffer: in place for a single
    /// buffer, gathered into a copy for a chain of several.
    public func withContiguousBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if parts.count == 1, let only = parts.first { return try body(UnsafeRawBufferPointer(only)) }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(totalLength)
        for part in parts { bytes.append(contentsOf: part) }
        return try bytes.withUnsafeBytes(body)
    }

    /// The first `count` bytes, gathered into `buffer` when they span parts
    /// (the Ethernet and IP headers of a chain); returns how many were there.
    public func prefix(_ count: Int, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        var copied = 0
        for part in parts where copied < count {
            let n = min(part.count, count - copied, buffer.count - copied)
            guard n > 0, let to = buffer.baseAddress, let from = part.baseAddress else { break }
            (to + copied).copyMemory(from: from, byteCount: n)
            copied += n
        }
        return copied
    }
}
