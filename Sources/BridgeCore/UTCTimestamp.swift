/// An instant as ISO 8601 in UTC to the second ("2026-12-07T14:23:39Z"):
/// what the daemon's plain log lines start with. The civil date comes from
/// the days since 1970 by arithmetic alone (proleptic Gregorian calendar,
/// Howard Hinnant's `civil_from_days`), so the daemon carries no calendar
/// or time-zone code for it (FoundationEssentials' `formatted(.iso8601)`
/// brought its whole calendar machinery into the binary).
public enum UTCTimestamp {
    /// `seconds` since 1970-01-01T00:00:00Z; years before 1 or after 9999
    /// are written with as many digits (and sign) as they take.
    public static func iso8601(secondsSince1970 seconds: Int64) -> String {
        let (days, second) = floorDivision(seconds, 86_400)
        let (year, month, day) = civil(daysSince1970: days)
        return "\(pad(year, 4))-\(pad(month, 2))-\(pad(day, 2))T\(pad(second / 3600, 2)):\(pad(second / 60 % 60, 2)):\(pad(second % 60, 2))Z"
    }

    /// The (year, month 1...12, day 1...31) of a day counted from 1970-01-01.
    static func civil(daysSince1970 days: Int64) -> (year: Int64, month: Int64, day: Int64) {
        // Shifted to 0000-03-01, so a leap day is the last day of its year;
        // eras of 400 years (146 097 days) repeat exactly. `days` is at
        // most Int64.max / 86 400, so nothing here can overflow.
        let (era, dayOfEra) = floorDivision(days + 719_468, 146_097)
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let shiftedMonth = (5 * dayOfYear + 2) / 153 // 0 = March ... 11 = February
        let day = dayOfYear - (153 * shiftedMonth + 2) / 5 + 1
        let month = shiftedMonth < 10 ? shiftedMonth + 3 : shiftedMonth - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }

    /// Quotient rounded toward minus infinity, and the remainder in 0..<d.
    private static func floorDivision(_ n: Int64, _ d: Int64) -> (Int64, Int64) {
        let q = n / d, r = n % d
        return r < 0 ? (q - 1, r + d) : (q, r)
    }

    private static func pad(_ value: Int64, _ width: Int) -> String {
        let digits = String(value.magnitude)
        let zeros = String(repeating: "0", count: max(0, width - digits.count))
        return (value < 0 ? "-" : "") + zeros + digits
    }
}
