/* The fixed texts of libvhost-pci-device's return codes (the rest of the
 * library is Swift behind vhost_pci_device.h: Sources/VhostPCIDevice). */
#include "vhost_pci_device.h"

unsigned vpd_abi_version(void) { return VPD_ABI_VERSION; }

const char *vpd_strerror(int code) {
    switch (code) {
    case VPD_OK: return "success";
    case VPD_EINVAL: return "invalid argument";
    case VPD_ECONNECT: return "cannot connect to the bridge's peer socket";
    case VPD_EREFUSED: return "the bridge refused this VM2";
    case VPD_ETIMEDOUT: return "no answer from the bridge in time";
    case VPD_ECLOSED: return "the connection to the bridge is over";
    case VPD_EBUSY: return "a call on the device from inside its own callback";
    case VPD_EFAULT: return "the range is not granted by VM1";
    case VPD_ENOMEM: return "out of memory";
    default: return code > 0 ? "not an error code" : "unknown error";
    }
}
