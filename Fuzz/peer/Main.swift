import FuzzSupport

@main
enum FuzzPeer {
    static func main() { runFuzzer { fuzzPeer($0, $1) } }
}
