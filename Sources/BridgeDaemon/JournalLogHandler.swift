import Foundation
import Logging
import Synchronization

/// A swift-log handler for stderr that is journald-friendly: under systemd
/// (JOURNAL_STREAM set) each line starts with the syslog priority `<N>` and
/// carries no timestamp (journald adds its own); otherwise a timestamp.
/// The level is shared by every logger so `log-level` changes apply live.
public struct JournalLogHandler: LogHandler {
    /// The daemon-wide level (changed by `log-level` and reload).
    public static let level = Mutex<Logger.Level>(.info)

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
        let all = metadata.merging(event.metadata ?? [:]) { $1 }
        let meta = all.isEmpty ? "" : all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + " "
        let line: String
        if journald {
            line = "<\(Self.priority(event.level))>\(meta)\(event.message)\n"
        } else {
            let time = ISO8601DateFormatter().string(from: Date())
            line = "\(time) \(event.level) \(label): \(meta)\(event.message)\n"
        }
        FileHandle.standardError.write(Data(line.utf8))
    }
}
