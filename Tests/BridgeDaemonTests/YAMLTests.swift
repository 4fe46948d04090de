import BridgeCore
import BridgeDaemon
import Testing

/// The config's YAML reader (libyaml's events, composed by
/// `DaemonConfig+YAML.swift`): bad input is a `ConfigError` naming the key
/// or the line and column, never a crash.
@Suite struct YAMLTests {
    func error(_ bytes: [UInt8]) -> ConfigError? {
        do { _ = try DaemonConfig.parse(utf8: bytes); return nil } catch { return error }
    }

    static let bridge = "bridges:\n  - name: a\n    bar-size: 1G\n"

    /// Each text and the start of its error.
    static let refused: [(String, String)] = [
        // Syntax: libyaml's problem, where, and what it was parsing.
        ("bridges: {a: [1}", "(file): not valid YAML: line 1, column 16: did not find expected ',' or ']' (while parsing a flow sequence, line 1, column 14)"),
        ("bridges: [", "(file): not valid YAML: line 2, column 1: did not find expected node content (while parsing a flow node, line 2, column 1)"),
        ("bridges: [\n", "(file): not valid YAML: line 2, column 1: did not find expected node content (while parsing a flow node, line 2, column 1)"),
        ("log-level: info\n  bad: indent\n", "(file): not valid YAML: line 2, column 6: mapping values are not allowed in this context"),
        ("\t- a", "(file): not valid YAML: line 1, column 1: found character that cannot start any token"),
        ("log-level: \"unterminated\n", "(file): not valid YAML: line 2, column 1: found unexpected end of stream (while scanning a quoted scalar, line 1, column 12)"),
        ("log-level: \"\\uD800\"", "(file): not valid YAML: line 1, column 15: found invalid Unicode character escape code (while parsing a quoted scalar, line 1, column 12)"),
        ("%YAML 2.0\n---\nlog-level: info\n", "(file): not valid YAML: line 1, column 1: found incompatible YAML document"),
        // One document only.
        ("log-level: info\n---\nlog-level: debug\n", "(file): not valid YAML: line 2, column 1: a second document; the file must hold one"),
        ("---\nlog-level: info\n...\n---\n", "(file): not valid YAML: line 4, column 1: a second document"),
        // Keys: plain names, each once.
        ("bridges:\n  - name: a\n    name: b\n", "bridges[0].name: is given twice (line 3, column 5)"),
        ("vm2-budgets: {&k v: 1G, *k : 2G}", "vm2-budgets.v: is given twice (line 1, column 25)"),
        ("[a]: 1", "(file): a mapping key is not a plain name (line 1, column 1)"),
        ("vm2-budgets: {? {a: 1} : 1G}", "vm2-budgets: a mapping key is not a plain name (line 1, column 17)"),
        ("x: &m {a: 1}\n*m : 1", "(file): a mapping key is not a plain name (line 2, column 1)"),
        // Aliases: only to an anchor already complete.
        ("log-level: *nope", "log-level: the alias *nope names no anchor before it (line 1, column 12)"),
        ("socket-directories: &a [*a]", "socket-directories[0]: the alias *a names no anchor before it (line 1, column 25)"),
        // An alias is as deep as what it names, wherever it is used.
        ("x: &deep " + String(repeating: "[", count: 20) + String(repeating: "]", count: 20) + "\ny: " + String(repeating: "[", count: 12) + "*deep"
         + String(repeating: "]", count: 12), "y[0][0][0][0][0][0][0][0][0][0][0][0]: nested deeper than 32 levels"),
        (String(repeating: "a:\n", count: 1) + (1..<40).map { String(repeating: " ", count: $0) + "a:\n" }.joined(),
         "a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a: nested deeper than 32 levels"),
        // Quoted scalars are strings, whatever they spell.
        (bridge + "    client: \"true\"", "bridges[0].client: must be true or false"),
        (bridge + "    client: !!str yes", "bridges[0].client: must be true or false"),
        (bridge + "    queue-pairs: !!int 0x1000", "bridges[0].queue-pairs: '4096' is not a whole number in 1...128"),
        // An escaped NUL stays in the value (and is refused by the key).
        ("log-level: \"de\\0bug\"", "log-level: 'de\0bug' is not one of"),
    ]

    @Test(arguments: refused.indices)
    func refusedTextsSayWhereAndWhy(index: Int) {
        let (text, expected) = Self.refused[index]
        guard let e = error(Array(text.utf8)) else { Issue.record("accepted: \(text.debugDescription)"); return }
        #expect(e.description.hasPrefix(expected), "got: \(e)")
    }

    @Test func anEmptyFileOrDocumentIsNotAMapping() {
        for text in ["", "---\n", "# only a comment\n", "\n\n"] {
            #expect(error(Array(text.utf8))?.description == "(file): the top level must be a mapping of keys", "\(text.debugDescription)")
        }
    }

    /// The file's bytes must be UTF-8: libyaml names the line, the column
    /// and the byte (it does not guess UTF-16 from a byte order mark).
    @Test func bytesThatAreNotUTF8AreRefused() throws {
        #expect(error(Array("log-level: info\nbridges: ".utf8) + [0xff, 0x41])?.description
                == "(file): not valid YAML: line 2, column 10: invalid leading UTF-8 octet (0xff)")
        #expect(error([0xff, 0xfe] + Array("l\0o\0g\0".utf8))?.description.hasPrefix("(file): not valid YAML: line 1, column 1: invalid leading UTF-8 octet") == true)
        #expect(error(Array("log-level: de".utf8) + [0xc3] + Array("bug".utf8))?.description.hasPrefix("(file): not valid YAML: line 1, column 15: invalid trailing UTF-8 octet (0x62)") == true)
        #expect(error(Array("log-level: de\0bug".utf8))?.description.hasPrefix("(file): not valid YAML: line 1, column 14: control characters are not allowed") == true)
        // A UTF-8 byte order mark is fine.
        #expect(try DaemonConfig.parse(utf8: [0xef, 0xbb, 0xbf] + Array("log-level: debug\n".utf8)).logLevel == .debug)
    }

    /// Plain `true`/`yes`/`on` and `false`/`no`/`off` (YAML 1.1's words)
    /// are booleans; other plain scalars keep their text (a number-looking
    /// name stays as written).
    @Test func plainBooleansAndTheTagsTheConfigHonours() throws {
        func bridge(_ extra: String) throws -> BridgeConfig { try DaemonConfig.parse(Self.bridge + extra).bridges[0] }
        for word in ["true", "True", "TRUE", "yes", "on", "!!bool y"] { #expect(try bridge("    client: \(word)\n").client, "\(word)") }
        for word in ["false", "no", "Off"] { #expect(try !bridge("    client: \(word)\n").client, "\(word)") }
        #expect(try bridge("    round-out-huge-pages: true\n").addressSpace.roundOutHugePages)
        #expect(try bridge("    queue-pairs: !!int 1_6\n").queuePairs == 16)
        #expect(try DaemonConfig.parse("bridges:\n  - name: 0x10\n    bar-size: 1G\n").bridges[0].name == "0x10")
        #expect(try DaemonConfig.parse("log-level: !custom debug\n").logLevel == .debug, "an unknown tag on a scalar: its text")
        #expect(try DaemonConfig.parse("bridges: !!seq\n  - !!map {name: a, bar-size: 1G}\n").bridges.count == 1, "tags on collections are ignored")
    }

    /// Anchors and aliases work, and cost what they name each time.
    @Test func aliasesNameWhatTheirAnchorHolds() throws {
        let c = try DaemonConfig.parse("""
        vm2-budgets: {&v shared: 4G}
        bridges:
          - {name: a, vm2: *v, bar-size: &size 2G}
          - &b {name: b, vm2: *v, bar-size: *size}
        socket-directories: &dirs [/run/a, /run/b]
        """)
        #expect(c.bridges.map(\.name) == ["a", "b"] && c.bridges.allSatisfy { $0.vm2 == "shared" })
        #expect(c.bridges.allSatisfy { $0.addressSpace.barSize == 2 << 30 } && c.vm2Budgets["shared"] == 4 << 30)
        #expect(c.socketDirectories == ["/run/a", "/run/b"])
        // A later anchor of the same name replaces the earlier one.
        #expect(try DaemonConfig.parse("runtime-directory: &p /run/x\ncontrol-socket: &p /run/c.sock\nsocket-directories: [*p]\n")
            .socketDirectories == ["/run/c.sock"])
    }

    /// Whatever the bytes, a config or a `ConfigError`: every prefix of a
    /// full config, and seeded random edits of it.
    @Test func damagedConfigsNeverCrash() {
        let full = Array("""
        runtime-directory: /run/vpb
        vm2-budgets: {v: &s 2T}
        socket-directories: &d [/run/x]
        bridges:
          - name: net0
            vm2: v
            bar-size: *s
            mode: iommu
            dma-window: "4G:16G"
            device-features: [event-idx]
            client: yes
          - {name: "net1", bar-size: !!str 64G, mode: static, static-windows: ['0:1G', "2G:3G"]}
        """.utf8)
        for n in 0...full.count { _ = error(Array(full.prefix(n))) }
        var random = YAMLDamage(seed: 24)
        let alphabet = Array("[]{}&*!|>-?:,#'\"\\\n\t %@`".utf8) + [0, 0x80, 0xc3, 0xff]
        for _ in 0..<3000 {
            var bytes = full
            for _ in 0...random.below(4) {
                let at = random.below(bytes.count)
                switch random.below(3) {
                case 0: bytes[at] = alphabet[random.below(alphabet.count)]
                case 1: bytes.insert(alphabet[random.below(alphabet.count)], at: at)
                default: bytes.remove(at: at)
                }
            }
            _ = error(bytes)
        }
    }

    /// Deeply nested input is refused at the 33rd level without reading the
    /// rest (no recursion that deep, in libyaml or here).
    @Test func deepNestingIsRefusedEarly() {
        let deep = String(repeating: "[", count: 200_000)
        #expect(error(Array(deep.utf8))?.reason == "nested deeper than 32 levels")
        let deepMaps = String(repeating: "{a: ", count: 100_000)
        #expect(error(Array(deepMaps.utf8))?.reason == "nested deeper than 32 levels")
    }
}

/// A small deterministic generator for the damage above.
struct YAMLDamage {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}
