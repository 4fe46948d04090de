extension FixedWidthInteger {
    /// `self + other`, or the maximum when that overflows: for counters fed
    /// by values a peer chooses (eventfd counts), which must never trap.
    public func addingSaturating(_ other: Self) -> Self {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? (other > 0 ? .max : .min) : sum
    }

    public mutating func addSaturating(_ other: Self) { self = addingSaturating(other) }
}
