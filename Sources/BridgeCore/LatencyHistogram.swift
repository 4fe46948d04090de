/// A latency distribution with fixed buckets, as a Prometheus histogram
/// exposes it (`_bucket{le=…}` cumulative, `_sum`, `_count`). Fixed bounds
/// from 5 µs to 2.5 s: a revocation acked by VM2 takes microseconds, one that
/// hits the deadline takes up to a second or more.
public struct LatencyHistogram: Sendable, Equatable {
    /// Upper bounds of the buckets, in seconds (the last, +Inf, is implicit).
    public static let boundLabels = ["0.000005", "0.00001", "0.000025", "0.00005", "0.0001", "0.00025", "0.0005",
                                     "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5"]
    public static let bounds: [Double] = boundLabels.compactMap(Double.init)
    /// Observations per bucket (not cumulative); the last is above every bound.
    public private(set) var buckets = [UInt64](repeating: 0, count: bounds.count + 1)
    public private(set) var count: UInt64 = 0
    public private(set) var sum: Double = 0

    public init() {}

    public mutating func record(_ duration: Duration) {
        let c = duration.components
        record(seconds: Double(c.seconds) + Double(c.attoseconds) * 1e-18)
    }

    public mutating func record(seconds: Double) {
        let value = seconds.isFinite ? max(0, seconds) : 0
        let index = Self.bounds.firstIndex { value <= $0 } ?? Self.bounds.count
        buckets[index] &+= 1
        count &+= 1
        sum += value
    }

    /// The Prometheus sample lines of this histogram for one label set
    /// (`labels` without braces, e.g. `bridge="net0"`), each starting with
    /// the suffix to append to the family name.
    public func samples(labels: String) -> [String] {
        let prefix = labels.isEmpty ? "" : labels + ","
        var lines: [String] = []
        var cumulative: UInt64 = 0
        for i in Self.bounds.indices {
            cumulative &+= buckets[i]
            lines.append("_bucket{\(prefix)le=\"\(Self.boundLabels[i])\"} \(cumulative)")
        }
        lines.append("_bucket{\(prefix)le=\"+Inf\"} \(count)")
        let braces = labels.isEmpty ? "" : "{\(labels)}"
        lines.append("_sum\(braces) \(sum)")
        lines.append("_count\(braces) \(count)")
        return lines
    }
}
