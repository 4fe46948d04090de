/// Where the buffers of one descriptor chain are in the BAR: offsets and
/// lengths, checked against the grants of the burst that took the chain.
/// It holds no pointer, so keeping one from burst to burst (its storage is
/// reused from chain to chain, so serving a packet allocates nothing) can
/// never reach memory a revocation between bursts unmapped: the bytes are
/// reached only through `ChainBytes`, which exists only inside a burst.
public struct Segments {
    /// One buffer: `count` bytes at `offset` in the BAR.
    public struct Part: Equatable, Sendable {
        public var offset: Int
        public var count: Int
        public init(offset: Int, count: Int) { self.offset = offset; self.count = count }
    }

    public private(set) var parts: [Part] = []
    public private(set) var totalLength = 0

    public init() { parts.reserveCapacity(16) }

    public mutating func removeAll() {
        parts.removeAll(keepingCapacity: true)
        totalLength = 0
    }

    mutating func append(_ part: Part) {
        parts.append(part)
        totalLength += part.count
    }

    /// `body` with these buffers resolved in `bar` (the burst's view of the BAR).
    @inline(__always)
    func withBytes<R>(in bar: UnsafeMutableRawBufferPointer, _ body: (borrowing ChainBytes) -> R) -> R {
        parts.withUnsafeBufferPointer { parts in
            body(ChainBytes(base: UnsafeRawBufferPointer(bar), parts: parts, totalLength: totalLength))
        }
    }

    /// Copies from `source` (starting `sourceOffset` bytes into it) into
    /// these buffers, resolved in `bar`, as much as fits; returns the bytes copied.
    func fill(in bar: UnsafeMutableRawBufferPointer, from source: borrowing ChainBytes, sourceOffset: Int) -> Int {
        guard let barBase = bar.baseAddress, let sourceBase = source.base.baseAddress else { return 0 }
        let sources = source.parts
        var copied = 0
        var s = 0, sOffset = sourceOffset
        // Find the source part holding `sourceOffset`.
        while s < sources.count, sOffset >= sources[s].count { sOffset -= sources[s].count; s += 1 }
        for dest in parts {
            var dOffset = 0
            while dOffset < dest.count, s < sources.count {
                let src = sources[s]
                let n = min(dest.count - dOffset, src.count - sOffset)
                if n > 0 {
                    (barBase + dest.offset + dOffset).copyMemory(from: sourceBase + src.offset + sOffset, byteCount: n)
                }
                dOffset += n; sOffset += n; copied += n
                if sOffset == src.count { s += 1; sOffset = 0 }
            }
            if s == sources.count { break }
        }
        return copied
    }
}

/// The bytes of one chain during a burst (or of a frame the caller holds),
/// read in place. Non-copyable and only ever lent as `borrowing`, so it
/// cannot be stored, returned or outlive the call that resolved it: no view
/// of the BAR survives the burst, and a revocation applied between bursts
/// never leaves one pointing at unmapped memory.
public struct ChainBytes: ~Copyable {
    /// What the parts' offsets are relative to: the BAR, or the caller's frame.
    let base: UnsafeRawBufferPointer
    let parts: UnsafeBufferPointer<Segments.Part>
    public let totalLength: Int

    init(base: UnsafeRawBufferPointer, parts: UnsafeBufferPointer<Segments.Part>, totalLength: Int) {
        self.base = base; self.parts = parts; self.totalLength = totalLength
    }

    /// `body` with `frame` (one contiguous buffer the caller owns, such as a
    /// frame the device made itself) as a chain.
    public static func withFrame<R>(_ frame: UnsafeRawBufferPointer, _ body: (borrowing ChainBytes) -> R) -> R {
        withUnsafeTemporaryAllocation(of: Segments.Part.self, capacity: 1) { one in
            one.initialize(repeating: Segments.Part(offset: 0, count: frame.count))
            return body(ChainBytes(base: frame, parts: UnsafeBufferPointer(one), totalLength: frame.count))
        }
    }

    public var partCount: Int { parts.count }

    /// Buffer `i`, valid only while this value is lent.
    public subscript(i: Int) -> UnsafeRawBufferPointer {
        let p = parts[i]
        return UnsafeRawBufferPointer(rebasing: base[p.offset..<p.offset + p.count])
    }

    /// The whole chain copied out.
    public var bytes: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(totalLength)
        for i in 0..<parts.count { bytes.append(contentsOf: self[i]) }
        return bytes
    }

    /// `body` with the whole chain as one buffer: in place for a single
    /// buffer, gathered into a copy for a chain of several.
    public func withContiguousBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if parts.count == 1 { return try body(self[0]) }
        return try bytes.withUnsafeBytes(body)
    }

    /// The first `count` bytes, gathered into `buffer` when they span parts
    /// (the Ethernet and IP headers of a chain); returns how many were there.
    public func prefix(_ count: Int, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        var copied = 0
        for i in 0..<parts.count where copied < count {
            let part = self[i]
            let n = min(part.count, count - copied, buffer.count - copied)
            guard n > 0, let to = buffer.baseAddress, let from = part.baseAddress else { break }
            (to + copied).copyMemory(from: from, byteCount: n)
            copied += n
        }
        return copied
    }
}
