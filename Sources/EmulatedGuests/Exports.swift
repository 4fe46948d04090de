// The emulated VM2 (and the test packets the guests exchange) live in
// PeerDevice, which libvhost-pci-device shares; whoever imports the
// emulated guests gets them too.
@_exported import PeerDevice
