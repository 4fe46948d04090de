import ArgumentParser
import BridgeCore
import FaultInjection
import Foundation
import LinuxIO

/// A fault scenario run in a process of its own (it takes this process to
/// `vm.max_map_count`): a grant at the limit is refused, a revocation at the
/// limit still revokes (the whole window, when the kernel refuses the split a
/// partial revocation needs), and the window works again once VMAs are free.
struct MapLimitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map-limit",
        abstract: "Fault scenario: fill this process's VMAs up to vm.max_map_count and show the BAR window refuses grants but never a revocation. Prints JSON."
    )

    struct Report: Encodable {
        var vmasFilled: Int
        var grantAtLimit: String
        var grantAtLimitFaults: Bool
        var partialRevokeAtLimit: String
        /// Probes of the three pages of the mapping partly revoked at the limit.
        var pagesAfterRevoke: [String]
        var grantAfterRelease: String
        var readAfterRelease: Bool
    }

    func run() throws {
        let page = BARWindow.hostPageSize
        let window = try BARWindow(size: 64 << 20)
        let memory = try Memfd(name: "map-limit", size: 4 * page)
        try memory.write(Array("granted".utf8), at: 0)
        let mapped = BusAddress(0x10_0000), other = BusAddress(0x80_0000)
        try window.map(bus: mapped, length: 3 * page, permission: .readWrite, fd: memory.fd.rawValue, fdOffset: 0)
        guard window.probeInChild(mapped) == .accessible else { throw ValidationError("the first grant is not readable") }

        let filler = try MapCountFiller()
        var report = Report(vmasFilled: filler.splits, grantAtLimit: "", grantAtLimitFaults: false, partialRevokeAtLimit: "",
                            pagesAfterRevoke: [], grantAfterRelease: "", readAfterRelease: false)
        do {
            try window.map(bus: other, length: page, permission: .read, fd: memory.fd.rawValue, fdOffset: 3 * page)
            report.grantAtLimit = "granted"
        } catch { report.grantAtLimit = "refused: \(error)" }
        report.grantAtLimitFaults = window.probeInChild(other) == .faulted
        do {
            try window.revoke(bus: BusAddress(mapped.rawValue + page), length: page)
            report.partialRevokeAtLimit = "revoked"
        } catch {
            if case .revokedWholeWindow = error { report.partialRevokeAtLimit = "whole window" } else { report.partialRevokeAtLimit = "failed: \(error)" }
        }
        report.pagesAfterRevoke = (0..<UInt64(3)).map { "\(window.probeInChild(BusAddress(mapped.rawValue + $0 * page)).map { "\($0)" } ?? "outside")" }
        filler.release()
        do {
            try window.map(bus: mapped, length: page, permission: .read, fd: memory.fd.rawValue, fdOffset: 0)
            report.grantAfterRelease = "granted"
        } catch { report.grantAfterRelease = "refused: \(error)" }
        report.readAfterRelease = window.withBytes(at: mapped, length: 7) { Array($0) } == Array("granted".utf8)
        try printJSON(report)
    }
}
