import LinuxIO
import Foundation
import Logging

/// A swift-log handler for stderr that is journald-friendly: under systemd
/// (JOURNAL_STREAM set) each line starts with the syslog priority `<N>` and
/// carries no timestamp (journald adds its own); otherwise a timestamp.
/// The level is shared by every logger so `log-level` changes apply live.
public struct JournalLogHandler: LogHandler {
    /// The daemon-wide level (changed by `log-level` and reload).
    public static let level = Locked<Logger.Level>(.info)

    public let label: String
    public let journald: Bool
    public var metadata: Logger.Metadata = [:]

    public init(label: String, journald: Bool = ProcessInfo.processInfo.environment["JOURNAL_STREAM"] != nil) {
        self.label = label
        self.journald = journald
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
        FileHandle.standardError.write(Data(line(level: event.level, message: "\(event.message)", metadata: event.metadata).utf8))
    }

    /// The text of one log line (the journald form carries `<priority>`).
    public func line(level: Logger.Level, message: String, metadata extra: Logger.Metadata?, date: Date = Date()) -> String {
        let all = metadata.merging(extra ?? [:]) { $1 }
        let meta = all.isEmpty ? "" : all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + " "
        if journald {
            return "<\(Self.priority(level))>\(meta)\(message)\n"
        }
        return "\(ISO8601DateFormatter().string(from: date)) \(level) \(label): \(meta)\(message)\n"
    }
}
