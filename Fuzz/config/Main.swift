import FuzzSupport

@main
enum FuzzConfig {
    static func main() { runFuzzer { fuzzConfig($0, $1) } }
}
