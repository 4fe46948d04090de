import Foundation
import Logging

/// Helpers every test target shares (one copy, not one per target).

/// True when a sanitizer's runtime (make test-asan / test-tsan) is linked
/// in (then into every binary the build made): its allocator replaces
/// glibc's and ignores glibc's tuning.
public let sanitizerAllocator: Bool = dlsym(nil, "__asan_init") != nil || dlsym(nil, "__tsan_init") != nil

/// Sizes, defined once for every test target.
public let KiB: UInt64 = 1 << 10
public let MiB: UInt64 = 1 << 20
public let GiB: UInt64 = 1 << 30
public let TiB: UInt64 = 1 << 40

/// SplitMix64: small, seeded, reproducible (a failing seed can be replayed).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// Polls `condition` every `everyMilliseconds` for up to `seconds`: a hang
/// guard for work another thread or process finishes, never a timing
/// assertion. Returns the condition's last value.
@discardableResult
public func pollUntil(seconds: Int = 20, everyMilliseconds: UInt32 = 1, _ condition: () -> Bool) -> Bool {
    for _ in 0..<(seconds * 1000 / Int(max(1, everyMilliseconds))) {
        if condition() { return true }
        usleep(everyMilliseconds * 1000)
    }
    return condition()
}

/// A logger that stays quiet (tests drive refusals on purpose).
public func quietLogger(_ label: String = "test") -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = .critical
    return logger
}
