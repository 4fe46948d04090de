// make c-examples and make deb-check build this at -O0 against
// libvhost-pci-device.a: a C++ program's own copies of libstdc++ templates
// that the Swift runtime inside also uses (std::vector<unsigned>::push_back)
// must not break the link. Exit 0 when the library answers its ABI version.
#include <cstdio>
#include <optional>
#include <vector>
#include <vhost_pci_device.h>

int main(int argc, char **) {
    std::optional<int> o;
    if (argc > 0) o = 1;
    std::vector<unsigned> v;
    v.push_back(vpd_abi_version());
    std::printf("%u %d %s\n", v.back(), o.value(), vpd_strerror(VPD_EINVAL));
    return v.back() == VPD_ABI_VERSION ? 0 : 1;
}
