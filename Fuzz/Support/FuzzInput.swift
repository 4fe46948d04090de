#if canImport(Glibc)
import Glibc
#endif

/// libFuzzer's input as a stream of decisions: each read takes the next
/// bytes, and an exhausted input reads as zeros (so every input is valid and
/// the fuzzer can grow it a byte at a time).
public struct FuzzInput {
    private let bytes: [UInt8]
    private var at = 0

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    }

    public var isEmpty: Bool { at >= bytes.count }
    public var remaining: Int { max(0, bytes.count - at) }

    public mutating func byte() -> UInt8 {
        guard at < bytes.count else { return 0 }
        defer { at += 1 }
        return bytes[at]
    }

    /// Up to `n` bytes (fewer at the end).
    public mutating func take(_ n: Int) -> [UInt8] {
        let n = max(0, min(n, remaining))
        defer { at += n }
        return Array(bytes[at..<(at + n)])
    }

    public mutating func u16() -> UInt16 { UInt16(byte()) | UInt16(byte()) << 8 }
    public mutating func u64() -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(byte()) << (8 * UInt64($1)) } }

    /// One of `choices`, picked by the next byte.
    public mutating func pick<T>(_ choices: [T]) -> T { choices[Int(byte()) % choices.count] }

    public mutating func rest() -> [UInt8] { take(remaining) }
}

/// A broken invariant: the fuzzer records the input that led here.
public func fuzzFailure(_ message: String) -> Never {
    fatalError("fuzz invariant broken: \(message)")
}

@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

/// Runs libFuzzer's driver (its usual command line: corpus directories,
/// `-max_total_time=`, `-runs=` …) on `callback`. SwiftPM gives every
/// executable its own `main`, so the targets start libFuzzer from theirs.
public func runFuzzer(_ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> Never {
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv, callback))
}

/// `TARGET --write-seeds DIR` writes the target's seed inputs (built with
/// the real encoders, so they stay valid as the codecs change) and exits;
/// `make fuzz-seeds` refreshes `Fuzz/corpus/` with it.
public func writeSeedsIfAsked(_ seeds: () -> [String: [UInt8]]) {
    let args = CommandLine.arguments
    guard args.count == 3, args[1] == "--write-seeds" else { return }
    for (name, bytes) in seeds() {
        guard let f = fopen("\(args[2])/\(name)", "wb") else { fuzzFailure("cannot write \(args[2])/\(name)") }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
    }
    exit(0)
}
