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
    public static func qemuArguments(socket: String, iommu: Bool, count: Int, size: Int, seconds: Double = 0) -> [String] {
        var device = "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,romfile=,vectors=0"
        var append = "console=ttyS0 panic=-1 loglevel=4 vpb.count=\(count) vpb.size=\(size) vpb.seconds=\(seconds)"
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

    /// What the guest printed on its console.
    public struct Report: Equatable, Sendable, Codable {
        public var sent: Int
        public var packetsPerSecond: Double
        public var txPackets: Int
        public var txDropped: Int
        public var dmarFaults: Int
    }

    /// The report, once the guest printed "vpb-guest done".
    public static func report(in output: String) -> Report? {
        guard output.contains("vpb-guest done") else { return nil }
        func number(after marker: String, in line: Substring) -> Double? {
            guard let r = line.range(of: marker) else { return nil }
            return Double(line[r.upperBound...].prefix { $0.isNumber || $0 == "." })
        }
        var report = Report(sent: 0, packetsPerSecond: 0, txPackets: 0, txDropped: 0, dmarFaults: 0)
        for line in output.split(separator: "\n") {
            if line.contains("vpb-sent ") {
                report.sent = Int(number(after: "vpb-sent ", in: line) ?? 0)
                report.packetsPerSecond = number(after: " s: ", in: line) ?? 0
            }
            if line.contains("vpb-guest tx_packets ") {
                report.txPackets = Int(number(after: "tx_packets ", in: line) ?? 0)
                report.txDropped = Int(number(after: "tx_dropped ", in: line) ?? 0)
            }
            if line.contains("vpb-guest dmar faults ") { report.dmarFaults = Int(number(after: "dmar faults ", in: line) ?? 0) }
        }
        return report
    }
}
