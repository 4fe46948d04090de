/// Keeps a hostile peer from flooding the journal: one line per key per
/// `interval`, and the next line that gets through says how many were held
/// back. Pure: the caller passes the time.
public struct LogThrottle: Sendable {
    public let interval: Duration
    private var last: [String: ContinuousClock.Instant] = [:]
    private var suppressed: [String: Int] = [:]

    public init(interval: Duration) { self.interval = interval }

    /// nil: do not log this one (it is counted). Otherwise log it, with the
    /// number of lines of the same key held back since the last one logged.
    public mutating func admit(_ key: String, now: ContinuousClock.Instant) -> Int? {
        if let at = last[key], now < at.advanced(by: interval) {
            suppressed[key, default: 0] += 1
            return nil
        }
        last[key] = now
        return suppressed.removeValue(forKey: key) ?? 0
    }
}
