import BridgeCore
import Foundation
import Testing

@Suite struct UTCTimestampTests {
    @Test(arguments: [
        (Int64(0), "1970-01-01T00:00:00Z"),
        (-1, "1969-12-31T23:59:59Z"),
        (951_782_400, "2000-02-29T00:00:00Z"), // a leap day of a year divisible by 400
        (4_107_542_399, "2100-02-28T23:59:59Z"), // 2100 is not a leap year
        (4_107_542_400, "2100-03-01T00:00:00Z"),
        (2_147_483_648, "2038-01-19T03:14:08Z"), // past 32-bit time_t
        (1_796_653_419, "2026-12-07T14:23:39Z"),
        (253_402_300_799, "9999-12-31T23:59:59Z"),
        (-62_135_596_800, "0001-01-01T00:00:00Z"),
        (-62_135_596_801, "0000-12-31T23:59:59Z"), // year 0 (1 BC), as ISO 8601 counts
    ])
    func knownInstants(seconds: Int64, expected: String) {
        #expect(UTCTimestamp.iso8601(secondsSince1970: seconds) == expected)
    }

    /// The same text as FoundationEssentials' ISO 8601 style, which the log
    /// lines used before, at instants spread over a thousand years.
    @Test func matchesFoundationsISO8601() {
        var generator = SystemRandomNumberGenerator()
        var instants: [Int64] = (0..<2000).map { _ in Int64.random(in: 0...(1 << 35), using: &generator) }
        instants += (0..<400).map { Int64($0) * 86_400 * 365 + 86_399 } // year ends and leap days nearby
        for t in instants {
            let ours = UTCTimestamp.iso8601(secondsSince1970: t)
            let foundation = Date(timeIntervalSince1970: TimeInterval(t)).formatted(.iso8601)
            #expect(ours == foundation, "at \(t)")
            if ours != foundation { break }
        }
    }

    @Test func theExtremesDoNotTrap() {
        #expect(UTCTimestamp.iso8601(secondsSince1970: .max).hasSuffix("Z"))
        #expect(UTCTimestamp.iso8601(secondsSince1970: .min).hasPrefix("-"))
    }
}
