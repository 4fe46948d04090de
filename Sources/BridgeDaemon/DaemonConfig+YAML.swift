import CYAML
import ControlWire

/// The YAML file as `ConfigValue`s: libyaml's events composed here, with
/// every limit checked while composing, then read by `DaemonConfig.parse`'s
/// typed checks. One document; mappings with plain keys given once each;
/// at most `maximumNodes` nodes (an alias counts every node of what it
/// names, each time it is used, so an alias bomb is refused, not expanded)
/// and `maximumDepth` levels. Tags on mappings and sequences are ignored;
/// on scalars, `!!int`, `!!bool`, `!!float` and `!!str` are honoured.
extension DaemonConfig {
    /// The single document of `bytes` (UTF-8) as a value; nil for an empty
    /// stream.
    static func compose(_ bytes: UnsafeBufferPointer<UInt8>) throws(ConfigError) -> ConfigValue? {
        // libyaml asserts a non-NULL input; an empty stream has no document.
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return nil }
        let composer = try YAMLComposer(base, count: bytes.count)
        return try composer.document()
    }

    /// A scalar as the config reads it. A plain scalar without a tag is a
    /// boolean when it is one of YAML 1.1's words (`true`, `yes`, `on`,
    /// `false`, `no`, `off`, in lower, capitalised or upper case), otherwise
    /// the text as written — keys that want numbers parse the text
    /// themselves, and names keep their spelling. An explicit tag is
    /// honoured: `!!int` (with `_`, `0x`, `0o`), `!!bool`, `!!float`;
    /// anything that does not parse stays a string, and the key's own check
    /// then says what it expected. (Yams' YAML 1.1 constructors trapped on
    /// some of these forms, e.g. a sexagesimal `3333333333333333333:3`,
    /// found by fuzz-config; nothing here can.)
    static func scalarValue(_ text: String, tag: String?, plain: Bool) -> ConfigValue {
        guard let tag else {
            if plain, let b = implicitBooleans[text] { return .bool(b) }
            return .string(text)
        }
        switch tag {
        case "tag:yaml.org,2002:int":
            let digits = text.replacing("_", with: "")
            if let v = Int(digits) { return .int(v) }
            if digits.hasPrefix("0x"), let v = Int(digits.dropFirst(2), radix: 16) { return .int(v) }
            if digits.hasPrefix("0o"), let v = Int(digits.dropFirst(2), radix: 8) { return .int(v) }
            return .string(text)
        case "tag:yaml.org,2002:bool":
            switch text.lowercased() {
            case "true", "yes", "on", "y": return .bool(true)
            case "false", "no", "off", "n": return .bool(false)
            default: return .string(text)
            }
        case "tag:yaml.org,2002:float":
            return Double(text).map(ConfigValue.double) ?? .string(text)
        default:
            return .string(text)
        }
    }

    static let implicitBooleans: [String: Bool] = {
        var words: [String: Bool] = [:]
        for (word, value) in [("true", true), ("yes", true), ("on", true), ("false", false), ("no", false), ("off", false)] {
            for spelling in [word, word.prefix(1).uppercased() + word.dropFirst(), word.uppercased()] { words[spelling] = value }
        }
        return words
    }()
}

/// Composes libyaml's events into `ConfigValue`s. Each event is copied into
/// an `Event` and freed at once (`yaml_event_delete`), and the parser is
/// freed with the composer, so no path leaks libyaml's memory. Recursion is
/// bounded: a node deeper than `maximumDepth` is refused before its
/// children are read.
final class YAMLComposer {
    /// A composed node, with what an alias to it costs.
    struct Composed {
        var value: ConfigValue
        /// Nodes it holds, itself included (keys not counted).
        var nodes: Int
        /// Levels below it (0 for a scalar).
        var height: Int
        /// A scalar's text as written, for an alias used as a mapping key.
        var text: String?
    }

    /// One libyaml event, copied out of C memory.
    struct Event {
        enum Kind { case streamStart, streamEnd, documentStart, documentEnd, alias, scalar, sequenceStart, sequenceEnd, mappingStart, mappingEnd, none }
        var kind: Kind
        var anchor: String?
        var tag: String?
        var value = ""
        /// A plain (unquoted, not block) scalar.
        var plain = false
        var line: Int
        var column: Int
        var position: String { "line \(line), column \(column)" }
    }

    private let parser: UnsafeMutablePointer<yaml_parser_t>
    private let input: UnsafePointer<UInt8>
    private let count: Int
    private var anchors: [String: Composed] = [:]
    private var budget = DaemonConfig.maximumNodes

    /// `input` must stay valid while the composer lives.
    init(_ input: UnsafePointer<UInt8>, count: Int) throws(ConfigError) {
        self.input = input
        self.count = count
        parser = .allocate(capacity: 1)
        guard yaml_parser_initialize(parser) == 1 else {
            parser.deallocate()
            throw ConfigError("(file)", "not valid YAML: the parser could not start (out of memory)")
        }
        yaml_parser_set_encoding(parser, YAML_UTF8_ENCODING)
        yaml_parser_set_input_string(parser, input, count)
    }

    deinit {
        yaml_parser_delete(parser)
        parser.deallocate()
    }

    /// The stream's only document; nil when it has none.
    func document() throws(ConfigError) -> ConfigValue? {
        try expect(.streamStart, try next())
        let start = try next()
        if start.kind == .streamEnd { return nil }
        try expect(.documentStart, start)
        let root = try node(try next(), path: "", depth: 0)
        try expect(.documentEnd, try next())
        let end = try next()
        guard end.kind == .streamEnd else {
            throw ConfigError("(file)", "not valid YAML: \(end.position): a second document; the file must hold one")
        }
        return root.value
    }

    private func expect(_ kind: Event.Kind, _ event: Event) throws(ConfigError) {
        guard event.kind == kind else { throw ConfigError("(file)", "not valid YAML: \(event.position): unexpected \(event.kind) event") }
    }

    private func node(_ event: Event, path: String, depth: Int) throws(ConfigError) -> Composed {
        let at = path.isEmpty ? "(file)" : path
        if event.kind == .alias {
            guard let name = event.anchor, let anchored = anchors[name] else {
                throw ConfigError(at, "the alias *\(event.anchor ?? "") names no anchor before it (\(event.position))")
            }
            budget -= anchored.nodes
            guard budget >= 0 else { throw ConfigError(at, "the file has more than \(DaemonConfig.maximumNodes) YAML nodes") }
            guard depth + anchored.height < DaemonConfig.maximumDepth else {
                throw ConfigError(at, "nested deeper than \(DaemonConfig.maximumDepth) levels")
            }
            return anchored
        }
        budget -= 1
        guard budget >= 0 else { throw ConfigError(at, "the file has more than \(DaemonConfig.maximumNodes) YAML nodes") }
        guard depth < DaemonConfig.maximumDepth else { throw ConfigError(at, "nested deeper than \(DaemonConfig.maximumDepth) levels") }
        let composed: Composed
        switch event.kind {
        case .scalar:
            composed = Composed(value: DaemonConfig.scalarValue(event.value, tag: event.tag, plain: event.plain), nodes: 1, height: 0,
                                text: event.value)
        case .sequenceStart:
            var items: [ConfigValue] = []
            var nodes = 1, height = 0
            while true {
                let item = try next()
                if item.kind == .sequenceEnd { break }
                let child = try node(item, path: "\(path)[\(items.count)]", depth: depth + 1)
                items.append(child.value)
                nodes += child.nodes
                height = max(height, child.height + 1)
            }
            composed = Composed(value: .list(items), nodes: nodes, height: height)
        case .mappingStart:
            var pairs: [String: ConfigValue] = [:]
            var nodes = 1, height = 0
            while true {
                let keyEvent = try next()
                if keyEvent.kind == .mappingEnd { break }
                let key: String
                switch keyEvent.kind {
                case .scalar:
                    key = keyEvent.value
                    if let anchor = keyEvent.anchor {
                        anchors[anchor] = Composed(value: DaemonConfig.scalarValue(key, tag: keyEvent.tag, plain: keyEvent.plain), nodes: 1,
                                                   height: 0, text: key)
                    }
                case .alias:
                    // An alias to a scalar names a key as the scalar does.
                    guard let name = keyEvent.anchor, let text = anchors[name]?.text else {
                        throw ConfigError(at, "a mapping key is not a plain name (\(keyEvent.position))")
                    }
                    key = text
                default:
                    throw ConfigError(at, "a mapping key is not a plain name (\(keyEvent.position))")
                }
                let child = path.isEmpty ? key : "\(path).\(key)"
                guard pairs[key] == nil else { throw ConfigError(child, "is given twice (\(keyEvent.position))") }
                let value = try node(try next(), path: child, depth: depth + 1)
                pairs[key] = value.value
                nodes += value.nodes
                height = max(height, value.height + 1)
            }
            composed = Composed(value: .mapping(pairs), nodes: nodes, height: height)
        default:
            throw ConfigError(at, "not valid YAML: \(event.position): unexpected \(event.kind) event")
        }
        if let anchor = event.anchor { anchors[anchor] = composed }
        return composed
    }

    /// The next event, copied; libyaml's copy is freed before this returns.
    private func next() throws(ConfigError) -> Event {
        var event = yaml_event_t()
        guard yaml_parser_parse(parser, &event) == 1 else { throw syntaxError() }
        defer { yaml_event_delete(&event) }
        var copy = Event(kind: .none, line: Int(event.start_mark.line) + 1, column: Int(event.start_mark.column) + 1)
        switch event.type {
        case YAML_STREAM_START_EVENT: copy.kind = .streamStart
        case YAML_STREAM_END_EVENT: copy.kind = .streamEnd
        case YAML_DOCUMENT_START_EVENT: copy.kind = .documentStart
        case YAML_DOCUMENT_END_EVENT: copy.kind = .documentEnd
        case YAML_ALIAS_EVENT:
            copy.kind = .alias
            copy.anchor = Self.string(event.data.alias.anchor)
        case YAML_SCALAR_EVENT:
            let scalar = event.data.scalar
            copy.kind = .scalar
            copy.anchor = Self.string(scalar.anchor)
            // A quoted or block scalar without a tag is a string (libyaml's
            // quoted_implicit); a plain one without a tag is resolved.
            copy.tag = scalar.quoted_implicit != 0 ? "tag:yaml.org,2002:str" : Self.string(scalar.tag)
            copy.plain = scalar.style == YAML_PLAIN_SCALAR_STYLE
            // The value may hold NUL (an escaped \0): by length.
            copy.value = scalar.value.map { String(decoding: UnsafeBufferPointer(start: $0, count: scalar.length), as: UTF8.self) } ?? ""
        case YAML_SEQUENCE_START_EVENT:
            copy.kind = .sequenceStart
            copy.anchor = Self.string(event.data.sequence_start.anchor)
        case YAML_SEQUENCE_END_EVENT: copy.kind = .sequenceEnd
        case YAML_MAPPING_START_EVENT:
            copy.kind = .mappingStart
            copy.anchor = Self.string(event.data.mapping_start.anchor)
        case YAML_MAPPING_END_EVENT: copy.kind = .mappingEnd
        default:
            // YAML_NO_EVENT: libyaml gives it after the stream's end or an error.
            copy.kind = .none
        }
        return copy
    }

    private static func string(_ pointer: UnsafeMutablePointer<yaml_char_t>?) -> String? {
        pointer.map { String(cString: $0) }
    }

    /// libyaml's error, with where and why: `line L, column C: problem
    /// (while parsing …, line L, column C)`.
    private func syntaxError() -> ConfigError {
        let p = parser.pointee
        let problem = p.problem.map { String(cString: $0) } ?? "unknown error"
        let text: String
        switch p.error {
        case YAML_MEMORY_ERROR:
            text = "out of memory"
        case YAML_READER_ERROR:
            // The reader names a byte offset, not a line: count the lines.
            let offset = min(max(p.problem_offset, 0), count)
            var line = 1, lineStart = 0
            for i in 0..<offset where input[i] == 10 { line += 1; lineStart = i + 1 }
            let value = p.problem_value >= 0 ? " (0x\(String(p.problem_value, radix: 16)))" : ""
            text = "line \(line), column \(offset - lineStart + 1): \(problem)\(value)"
        default:
            let mark = p.problem_mark
            var t = "line \(mark.line + 1), column \(mark.column + 1): \(problem)"
            if let context = p.context.map({ String(cString: $0) }) {
                t += " (\(context), line \(p.context_mark.line + 1), column \(p.context_mark.column + 1))"
            }
            text = t
        }
        return ConfigError("(file)", "not valid YAML: \(text)")
    }
}
