/// What `--print-capabilities` prints, QEMU's `docs/interop/vhost-user.json`
/// convention (`VHostUserBackendCapabilities`): a back end of type `net`.
/// That schema defines no capability list for `net` (only for `gpu` and
/// `input`), so the object has the type alone. The discovery file installed
/// as `/usr/share/qemu/vhost-user/50-vhost-pci-bridged.json` names the same
/// type; a test keeps the two in step.
public enum Capabilities {
    public static let backendType = "net"
    public static var json: String { #"{"type": "\#(backendType)"}"# }
}
