import BridgeDaemon
import FuzzSupport

/// The config parser on arbitrary bytes, as the daemon reads a file (not
/// UTF-8 included): it returns a config or a `ConfigError` naming a key; it
/// never traps. An accepted config must describe bridges that can be built
/// (their settings validate) and parse the same way twice.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzConfig(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let bytes = input.rest()
    guard let config = try? DaemonConfig.parse(utf8: bytes) else { return 0 }
    guard let again = try? DaemonConfig.parse(utf8: bytes), again == config else { fuzzFailure("the same bytes parsed two ways") }
    var names: Set<String> = []
    for b in config.bridges {
        guard names.insert(b.name).inserted else { fuzzFailure("two bridges named \(b.name)") }
        do { try b.addressSpace.validate() } catch { fuzzFailure("accepted bridge \(b.name) has an invalid address space: \(error)") }
        if b.queuePairs < 1 || b.queuePairs > 128 { fuzzFailure("queue-pairs \(b.queuePairs) accepted") }
    }
    return 0
}
