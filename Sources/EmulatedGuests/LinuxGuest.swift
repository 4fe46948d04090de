import Foundation

/// A real Linux guest as VM1: Debian's cloud kernel and a busybox initramfs
/// (built by `interop/linux-guest/build.sh`, `make interop-deps`) under QEMU
/// TCG, sending UDP through virtio-net with or without intel-iommu in strict
/// mode. Used by `make interop` and `vhost-pci-bench linux-guest`.
public enum LinuxGuest {
    /// Where the kernel and initramfs are: `$VPB_LINUX_GUEST`, else
    /// `.build/linux-guest` under the current directory (the package root).
    public static var directory: String {
        ProcessInfo.processInfo.environment["VPB_LINUX_GUEST"]
            ?? FileManager.default.currentDirectoryPath + "/.build/linux-guest"
    }

    public static var isBuilt: Bool {
        FileManager.default.fileExists(atPath: directory + "/vmlinuz") && FileManager.default.fileExists(atPath: directory + "/initrd.cpio.gz")
    }

    public static let missing = "the Linux guest is not built: make interop-deps (runs interop/linux-guest/build.sh)"

    /// QEMU's arguments: q35 TCG, 256 MiB of shared memfd RAM, virtio-net on
    /// `socket` (INTx: QEMU 7.2 crashes on MSI-X with vhost-user under a
    /// vIOMMU), and with `iommu` intel-iommu and `iommu.strict=1`. The guest
    /// sends `count` datagrams of `size` bytes (or for `seconds`).
    /// With `receive` the guest sends nothing: it counts (and checks) the
    /// UDP datagrams that arrive on port 9999 for `seconds` from the first.
    /// With `.both` the guest sends as in `.send` and at the same time
    /// counts and checks the datagrams that come back to port 9999 for
    /// `seconds` from the start, with their sequence numbers (a migration's
    /// traffic).
    public enum Mode: String, Sendable { case send, receive, both }

    public static func qemuArguments(socket: String, iommu: Bool, count: Int, size: Int, seconds: Double = 0, receive: Bool = false,
                                     mode: Mode = .send) -> [String] {
        var device = "virtio-net-pci,netdev=n0,mac=\(guestMAC),romfile=,vectors=0"
        var append = "console=ttyS0 panic=-1 loglevel=4 vpb.count=\(count) vpb.size=\(size) vpb.seconds=\(seconds)"
        let mode = receive ? .receive : mode
        if mode != .send { append += " vpb.mode=\(mode.rawValue)" }
        var args = ["-machine", "q35,accel=tcg", "-m", "256",
                    "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
                    "-chardev", "socket,id=c0,path=\(socket)", "-netdev", "vhost-user,id=n0,chardev=c0"]
        if iommu {
            args += ["-device", "intel-iommu"]
            device += ",iommu_platform=on,disable-legacy=on"
            append += " intel_iommu=on iommu.strict=1"
        }
        args += ["-device", device, "-kernel", directory + "/vmlinuz", "-initrd", directory + "/initrd.cpio.gz",
                 "-append", append, "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-display", "none"]
        return args
    }

    /// The guest's address (eth0), and the one it sends to (VM2's side).
    public static let guestMACBytes: [UInt8] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01]
    public static var guestMAC: String { guestMACBytes.map { String(format: "%02x", $0) }.joined(separator: ":") }
    public static let guestIP: [UInt8] = [10, 0, 0, 1]
    public static let peerMAC: [UInt8] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02]
    public static let peerIP: [UInt8] = [10, 0, 0, 2]
    public static let port: UInt16 = 9999

    /// A virtio-net header (num_buffers 1) and an Ethernet/IPv4/UDP frame
    /// from VM2's side to the guest's port 9999, with `size` bytes of payload
    /// in the guest's own format (magic "VPBG", `sequence`, size, then bytes
    /// (sequence * 7 + i) & 0xff): what `udp-receiver` counts as valid. The
    /// IPv4 header checksum is computed; the UDP checksum is 0 (none).
    public static func datagramFrame(size: Int, sequence: UInt32 = 0) -> [UInt8] {
        let payload = max(12, min(size, 1472))
        var header = [UInt8](repeating: 0, count: 12)
        header[10] = 1
        var frame = guestMACBytes + peerMAC + [0x08, 0x00]
        let total = 20 + 8 + payload
        var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), 0, 0, 0x40, 0, 64, 17, 0, 0] + peerIP + guestIP
        var sum: UInt32 = 0
        for i in stride(from: 0, to: 20, by: 2) { sum += UInt32(ip[i]) << 8 | UInt32(ip[i + 1]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        let checksum = ~UInt16(sum)
        ip[10] = UInt8(checksum >> 8); ip[11] = UInt8(checksum & 0xff)
        let udpLength = 8 + payload
        let udp: [UInt8] = [UInt8(port >> 8), UInt8(port & 0xff), UInt8(port >> 8), UInt8(port & 0xff),
                            UInt8(udpLength >> 8), UInt8(udpLength & 0xff), 0, 0]
        var body = [UInt8](repeating: 0, count: payload)
        for (i, v) in [UInt32(0x4742_5056), sequence, UInt32(payload)].enumerated() {
            withUnsafeBytes(of: v.littleEndian) { for k in 0..<4 { body[i * 4 + k] = $0[k] } }
        }
        for i in 12..<payload { body[i] = UInt8(truncatingIfNeeded: sequence &* 7 &+ UInt32(i)) }
        frame += ip + udp + body
        return header + frame
    }

    /// What the guest printed on its console.
    public struct Report: Equatable, Sendable, Codable {
        public var sent: Int
        public var packetsPerSecond: Double
        public var txPackets: Int
        public var txDropped: Int
        public var dmarFaults: Int
        /// Receive runs: datagrams that arrived (valid: in the guest's own
        /// format, checked byte by byte; corrupt: in it but wrong; other:
        /// not in it), their rate, and the interface's counters.
        public var received = 0
        public var valid = 0
        public var corrupt = 0
        public var other = 0
        public var receivedPerSecond: Double = 0
        public var rxPackets = 0
        public var rxDropped = 0
        /// `.both` runs: the first and highest sequence numbers that came
        /// back valid, how many in between did not, how many came out of
        /// order, and the longest time without one (seconds).
        public var sequenceFirst = 0
        public var sequenceLast = 0
        public var missing = 0
        public var reordered = 0
        public var longestGapSeconds: Double = 0
    }

    /// The report, once the guest printed "vpb-guest done".
    public static func report(in output: String) -> Report? {
        guard output.contains("vpb-guest done") else { return nil }
        func number(after marker: String, in line: Substring) -> Double? {
            guard let r = line.range(of: marker) else { return nil }
            return Double(line[r.upperBound...].prefix { $0.isNumber || $0 == "." })
        }
        var report = Report(sent: 0, packetsPerSecond: 0, txPackets: 0, txDropped: 0, dmarFaults: 0)
        for line in output.split(whereSeparator: \.isNewline) { // a serial console ends lines with "\r\n": one Character
            if line.contains("vpb-sent ") {
                report.sent = Int(number(after: "vpb-sent ", in: line) ?? 0)
                report.packetsPerSecond = number(after: " s: ", in: line) ?? 0
            }
            if line.contains("vpb-guest tx_packets ") {
                report.txPackets = Int(number(after: "tx_packets ", in: line) ?? 0)
                report.txDropped = Int(number(after: "tx_dropped ", in: line) ?? 0)
            }
            if line.contains("vpb-received ") {
                report.received = Int(number(after: "vpb-received ", in: line) ?? 0)
                report.valid = Int(number(after: "(", in: line) ?? 0)
                report.corrupt = Int(number(after: "valid, ", in: line) ?? 0)
                report.other = Int(number(after: "corrupt, ", in: line) ?? 0)
                report.receivedPerSecond = number(after: " s: ", in: line) ?? 0
            }
            if line.contains("vpb-guest rx_packets ") {
                report.rxPackets = Int(number(after: "rx_packets ", in: line) ?? 0)
                report.rxDropped = Int(number(after: "rx_dropped ", in: line) ?? 0)
            }
            if line.contains("vpb-sequence ") {
                report.sequenceFirst = Int(number(after: "first ", in: line) ?? 0)
                report.sequenceLast = Int(number(after: "last ", in: line) ?? 0)
                report.missing = Int(number(after: "missing ", in: line) ?? 0)
                report.reordered = Int(number(after: "reordered ", in: line) ?? 0)
                report.longestGapSeconds = number(after: "longest-gap ", in: line) ?? 0
            }
            if line.contains("vpb-guest dmar faults ") { report.dmarFaults = Int(number(after: "dmar faults ", in: line) ?? 0) }
        }
        return report
    }
}
