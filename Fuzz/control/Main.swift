import FuzzSupport

@main
enum FuzzControl {
    static func main() { runFuzzer { fuzzControl($0, $1) } }
}
