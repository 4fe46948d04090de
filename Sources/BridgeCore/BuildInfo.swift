/// The release every binary reports (`--version`), the Debian package's
/// version and the `vhost_pci_build_info` metric.
public enum BuildInfo {
    public static let version = "0.9.0"
}
