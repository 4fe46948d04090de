import Testing
import TestSupport
import SystemPackage
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

/// All LinuxIO tests live under one serialized suite: several of them count
/// this process's open fds, which only means something when no other test
/// opens fds at the same time (BridgeCore tests open none).
@Suite(.serialized) struct LinuxIOTests {}

/// Asserts that `body` leaves the process's fd count where it found it.
func expectNoFDLeak(_ what: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) rethrows {
    let before = settledOpenFileDescriptorCount()
    try body()
    let after = openFileDescriptorCount()
    #expect(after == before, "\(what): \(before) fds before, \(after) after", sourceLocation: sourceLocation)
}

/// Resident set size of this process in KiB (VmRSS from /proc/self/status;
/// `field: "RssAnon:"` for its anonymous part).
/// How much the resident set grew since `before` (KiB); 0 when it shrank
/// (the allocator gave memory back meanwhile, as ASan's does).
func residentGrowthKiB(since before: UInt64) -> UInt64 {
    let now = residentKiB()
    return now > before ? now - before : 0
}

func residentKiB(field: String = "VmRSS:") -> UInt64 {
    guard let file = fopen("/proc/self/status", "r") else { return 0 }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, Int32(line.count), file) != nil {
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if text.hasPrefix(field) {
            return UInt64(text.dropFirst(field.count).filter(\.isNumber)) ?? 0
        }
    }
    return 0
}

func temporaryPath(_ name: String) -> String {
    "/tmp/vpb-test-\(getpid())-\(name)"
}
