import BridgeCore
import LinuxIO
import FoundationEssentials
import Logging

/// A swift-log handler for journald and plain stderr. Under systemd
/// (stderr is the stream JOURNAL_STREAM names) with journald's socket there, each entry goes
/// through the native journal protocol with structured fields — MESSAGE,
/// PRIORITY, SYSLOG_IDENTIFIER and one field per metadata key (`bridge` →
/// BRIDGE=, `rule` → RULE=, `peer` → PEER=) — so `journalctl RULE=iotlb-perm`
/// finds them. If an entry cannot be sent it goes to stderr with the syslog
/// priority `<N>` and no timestamp (journald adds its own); without systemd,
/// stderr lines with a timestamp. The level is shared by every logger so
/// `log-level` changes apply live.
public struct JournalLogHandler: LogHandler {
    /// The daemon-wide level (changed by `log-level` and reload).
    public static let level = Locked<Logger.Level>(.info)

    public let label: String
    public let journald: Bool
    public let journal: JournalSocket?
    public var metadata: Logger.Metadata = [:]

    /// Whether this process's stderr is connected to the journal
    /// (`$JOURNAL_STREAM` names stderr's device and inode).
    public static let underJournald = JournalSocket.stderrIsJournal(ProcessInfo.processInfo.environment["JOURNAL_STREAM"])

    /// The process's journal connection: only when stderr is the journal.
    public static let processJournal: JournalSocket? = underJournald ? JournalSocket.available() : nil

    public init(label: String, journald: Bool = JournalLogHandler.underJournald,
                journal: JournalSocket? = JournalLogHandler.processJournal) {
        self.label = label
        self.journald = journald
        self.journal = journald ? journal : nil
    }

    public var logLevel: Logger.Level {
        get { Self.level.withLock { $0 } }
        set { Self.level.withLock { $0 = newValue } }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    public func log(event: LogEvent) {
        if let journal, journal.send(entry(level: event.level, message: "\(event.message)", metadata: event.metadata)) { return }
        Files.writeStandardError(line(level: event.level, message: "\(event.message)", metadata: event.metadata))
    }

    /// One native-protocol entry: `KEY=value\n` per field, or, for a value
    /// holding a newline, `KEY\n`, its length as 64-bit little endian, the
    /// bytes and `\n`.
    public func entry(level: Logger.Level, message: String, metadata extra: Logger.Metadata?) -> [UInt8] {
        var fields: [(String, String)] = [("MESSAGE", message), ("PRIORITY", "\(Self.priority(level))"),
                                          ("SYSLOG_IDENTIFIER", "vhost-pci-bridged"), ("LOGGER", label)]
        for (key, value) in metadata.merging(extra ?? [:], uniquingKeysWith: { $1 }).sorted(by: { $0.key < $1.key }) {
            if let name = Self.fieldName(key) { fields.append((name, "\(value)")) }
        }
        var out: [UInt8] = []
        for (name, value) in fields {
            out += Array(name.utf8)
            if value.utf8.contains(10) {
                out.append(10)
                var length = UInt64(value.utf8.count).littleEndian
                withUnsafeBytes(of: &length) { out += $0 }
                out += Array(value.utf8)
            } else {
                out.append(UInt8(ascii: "="))
                out += Array(value.utf8)
            }
            out.append(10)
        }
        return out
    }

    /// A metadata key as a journal field name: upper case letters, digits and
    /// underscores, not starting with an underscore or a digit (those are
    /// journald's trusted fields), at most 64 bytes. nil when nothing is left.
    static func fieldName(_ key: String) -> String? {
        var name = String(key.uppercased().map { ($0.isASCII && ($0.isLetter || $0.isNumber)) ? $0 : "_" })
        while let first = name.first, first == "_" || first.isNumber { name.removeFirst() }
        name = String(name.prefix(64))
        let reserved: Set<String> = ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "LOGGER"]
        return name.isEmpty || reserved.contains(name) ? nil : name
    }

    /// The text of one log line (the journald form carries `<priority>`).
    public func line(level: Logger.Level, message: String, metadata extra: Logger.Metadata?, date: Date = .now) -> String {
        let all = metadata.merging(extra ?? [:]) { $1 }
        let meta = all.isEmpty ? "" : all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + " "
        if journald {
            return "<\(Self.priority(level))>\(meta)\(message)\n"
        }
        let seconds = Int64(date.timeIntervalSince1970.rounded(.down))
        return "\(UTCTimestamp.iso8601(secondsSince1970: seconds)) \(level) \(label): \(meta)\(message)\n"
    }
}
