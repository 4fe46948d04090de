import FuzzSupport

@main
enum FuzzVhostUser {
    static func main() { runFuzzer { fuzzVhostUser($0, $1) } }
}
