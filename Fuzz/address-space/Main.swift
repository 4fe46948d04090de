import FuzzSupport

@main
enum FuzzAddressSpace {
    static func main() { runFuzzer { fuzzAddressSpace($0, $1) } }
}
