# vhost-pci-bridge — build, test, demo, install.
# `make demo` and `make test` are the two commands of the README's quick start.

SWIFT   ?= swift
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  := $(DESTDIR)$(PREFIX)/bin
APT_PACKAGES := liburing-dev libyaml-dev
# What make test checks with (make check-deps): dpkg-shlibdeps, fakeroot and
# lintian (make deb, deb-check), promtool (package prometheus: the metrics exposition),
# virt-xml-validate (the libvirt recipe in docs/examples).
CHECK_PACKAGES := dpkg-dev lintian fakeroot man-db prometheus libvirt-clients libxml2-utils gcc g++ pkg-config
# Real vhost-user front ends for `make interop` (DPDK testpmd, QEMU with iPXE,
# and a Linux guest built from Debian's kernel and busybox with gcc).
INTEROP_PACKAGES := dpdk-dev qemu-system-x86 gcc g++ libc6-dev pkg-config

.PHONY: c-examples install-lib all deps check-deps interop-deps build release test interop demo bench install install-files install-tools uninstall deb deb-check clean fuzz fuzz-build fuzz-seeds test-asan test-tsan soak

all: build

# $(call install-missing,PACKAGES,MAKE-TARGET,APT-FLAGS): installs with apt the
# packages that are not installed yet; needs root only when something is missing.
define install-missing
	@missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "error: missing packages:$$missing. Run 'sudo make $(2)' (or: sudo apt-get install$(if $(3), $(3))$$missing)." >&2; exit 1; \
	  fi; \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(3) $$missing; \
	fi
endef

# The system packages the build needs.
deps:
	$(call install-missing,$(APT_PACKAGES),deps,)

# The tools make test checks with (not needed to build or install).
check-deps:
	$(call install-missing,$(CHECK_PACKAGES),check-deps,--no-install-recommends)

interop-deps:
	$(call install-missing,$(INTEROP_PACKAGES),interop-deps,--no-install-recommends)
	sh interop/linux-guest/build.sh .build/linux-guest

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

# The whole suite except the real-front-end scenarios (those are `make interop`),
# then a short run of every fuzz target.
test: deps check-deps
	$(SWIFT) build
	@if command -v systemd-analyze >/dev/null 2>&1; then sh systemd/check.sh .build/debug/vhost-pci-bridged; \
	else echo "systemd-analyze is not installed: unit checks SKIPPED (apt-get install systemd)"; fi
	sh docs/examples/check.sh xml
	$(MAKE) fuzz FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS)
	$(MAKE) deb-check
	$(SWIFT) test --no-parallel --skip InteropTests

# The suite under AddressSanitizer (with LeakSanitizer) and ThreadSanitizer,
# each in its own build directory; sanitizers/ holds the few suppressions,
# each with its reason. Both run in .ci/run.
test-asan: deps check-deps
	$(SWIFT) build --build-tests --build-path .build-asan --sanitize=address
	ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/sanitizers/lsan.supp \
	  $(SWIFT) test --skip-build --build-path .build-asan --sanitize=address --disable-xctest --no-parallel --skip InteropTests

test-tsan: deps check-deps
	@if grep -rnE '(^|[^A-Za-z0-9_])Mutex *[<(]' Sources Tests | grep -vE '^[^:]+:[0-9]+:[[:space:]]*(//|\*)'; then \
	  echo "error: Synchronization.Mutex (above) locks with futexes TSan cannot see, so what it guards is reported as a race; use LinuxIO.Locked" >&2; exit 1; fi
	@if grep -rnE 'Locked *(\( *(\( *\)|Void *\( *\)) *\)|< *(\( *\)|Void) *>)' Sources Tests | grep -vE '^[^:]+:[0-9]+:[[:space:]]*(//|\*)'; then \
	  echo "error: a Locked around nothing (above) is reported by TSan as a race on its empty value; lock the state it guards" >&2; exit 1; fi
	$(SWIFT) build --build-tests --build-path .build-tsan --sanitize=thread
	TSAN_OPTIONS=halt_on_error=1:suppressions=$(CURDIR)/sanitizers/tsan.supp \
	  $(SWIFT) test --skip-build --build-path .build-tsan --sanitize=thread --disable-xctest --no-parallel --skip InteropTests

# The release daemon under churn for DURATION seconds (traffic with IOTLB
# churn, VM1/VM2 reconnects, control queries), sampled every second; fails on
# unbounded growth of RSS, fds or mappings, or on leftovers (docs/testing.md).
DURATION ?= 600
soak: deps
	$(SWIFT) build -c release --product vhost-pci-bridged
	$(SWIFT) build -c release --product vhost-pci-bench
	.build/release/vhost-pci-bench soak --seconds $(DURATION)

# Coverage-guided fuzzing (libFuzzer + AddressSanitizer), docs/testing.md.
FUZZ_TARGETS := vhost-user peer address-space config control
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_BUILD = VPB_FUZZ=1 $(SWIFT) build --build-path .build-fuzz -c release -Xswiftc -sanitize=fuzzer,address

fuzz-build: deps
	@for t in $(FUZZ_TARGETS); do $(FUZZ_BUILD) --product fuzz-$$t || exit 1; done

# Each target for FUZZ_SECONDS (default 10 minutes) from Fuzz/corpus.
fuzz: fuzz-build
	sh Fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Rewrites the seed corpus from the real encoders.
fuzz-seeds: fuzz-build
	@for t in $(FUZZ_TARGETS); do mkdir -p Fuzz/corpus/$$t && .build-fuzz/release/fuzz-$$t --write-seeds Fuzz/corpus/$$t || exit 1; done

# DPDK testpmd and QEMU against the daemon and an emulated VM2. A peer that is
# not installed makes its tests skip, saying what to install.
interop: deps check-deps c-examples
	$(SWIFT) test --no-parallel --filter InteropTests
	sh docs/examples/check.sh qemu .build/debug/vhost-pci-bridged

# libvhost-pci-device (VM2 for C data planes, docs/device-api.md): the C
# examples built against it the way an application is, with pkg-config (an
# uninstalled .pc in .build/c-vm2 pointing at this tree; C_BUILD=release for
# the release library). make interop runs them against testpmd.
C_BUILD ?= debug
VERSION := $(shell sed -n 's/.*static let version = "\(.*\)".*/\1/p' Sources/BridgeCore/BuildInfo.swift)
# $(call pc-files,PREFIX,LIBDIR,INCLUDEDIR,EXTRA_LIBS,DIR): vhost-pci-device.pc and
# vhost-pci-device-static.pc in DIR from their templates (EXTRA_LIBS: more Libs
# of the shared library's).
pc-files = for pc in vhost-pci-device vhost-pci-device-static; do \
	  sed -e 's|@PREFIX@|$(1)|' -e 's|@LIBDIR@|$(2)|' -e 's|@INCLUDEDIR@|$(3)|' -e 's|@VERSION@|$(VERSION)|' -e 's|@EXTRA_LIBS@|$(4)|' \
	    packaging/pkgconfig/$$pc.pc.in > $(5)/$$pc.pc || exit 1; done
# The uninstalled .pc's Libs: the library is found where it was built.
RPATH_LIBS = $(empty) -Wl$(comma)-rpath$(comma)$${libdir}
comma := ,
empty :=
# The shared library exports the vpd_* calls only (version node VHOST_PCI_DEVICE_1).
LIB_EXPORTS = -Xlinker --version-script=$(CURDIR)/packaging/lib/vhost-pci-device.map
# The C examples: the counter links the shared library, the forwarder the
# static one (make interop serves testpmd with both). Both libraries are
# copied into .build/c-vm2 (the shared one under its SONAME): the next build
# of the tree relinks .build/$(C_BUILD)'s without the version script.
c-examples: deps
	$(SWIFT) build --product vhost-pci-device $(if $(filter release,$(C_BUILD)),-c release) $(LIB_EXPORTS)
	mkdir -p .build/c-vm2/pkgconfig
	cp .build/$(C_BUILD)/libvhost-pci-device.so .build/c-vm2/libvhost-pci-device.so.1
	ln -sf libvhost-pci-device.so.1 .build/c-vm2/libvhost-pci-device.so
	SWIFT=$(SWIFT) sh packaging/lib/static-lib.sh .build/$(C_BUILD) .build/c-vm2/libvhost-pci-device.a
	$(call pc-files,$(CURDIR),$(CURDIR)/.build/c-vm2,$(CURDIR)/Sources/CVhostPCIDevice/include,$(RPATH_LIBS),.build/c-vm2/pkgconfig)
	set -e; for e in counter:vhost-pci-device forwarder:vhost-pci-device-static; do \
	  cc -std=c11 -O2 -Wall -Wextra -Werror -o .build/c-vm2/vpd-$${e%%:*} examples/c-vm2/$${e%%:*}.c \
	    $$(PKG_CONFIG_PATH=$(CURDIR)/.build/c-vm2/pkgconfig pkg-config --cflags --libs $${e#*:}); done
	! ldd .build/c-vm2/vpd-forwarder | grep -q -e libvhost-pci-device -e libswift
	g++ -std=c++17 -O0 -Wall -Werror -o .build/c-vm2/vpd-link-check packaging/lib/link-check.cc \
	  $$(PKG_CONFIG_PATH=$(CURDIR)/.build/c-vm2/pkgconfig pkg-config --cflags --libs vhost-pci-device-static)
	.build/c-vm2/vpd-link-check

# The demo runs release builds: the numbers it prints mean something.
demo: deps
	$(SWIFT) build -c release
	.build/release/vhost-pci-demo

# Benchmarks report ratios against baselines measured in the same run, and
# write docs/benchmarks.md.
bench: deps check-deps
	$(SWIFT) build -c release --product vhost-pci-bench
	$(SWIFT) build -c release --product vhost-pci-bridged
	$(MAKE) -s deb > /dev/null
	{ echo "# Benchmarks"; echo; \
	  echo "Written by \`make bench\` ($$(nproc) cores, $$(uname -r), $$(date -u +%Y-%m-%d)). Numbers move with the machine's load; the ratios are what to compare."; echo; \
	  echo "### Address lookup (\`vhost-pci-bench lookup\`)"; echo; \
	  .build/release/vhost-pci-bench lookup; echo; \
	  .build/release/vhost-pci-bench notify; echo; \
	  .build/release/vhost-pci-bench iotlb; echo; \
	  echo "The same with a VM2 that did not negotiate the revocation channel (MAP/UNMAP and ACK on the socket), measured right after:"; echo; \
	  .build/release/vhost-pci-bench iotlb --socket-only | sed -n '/^|/p;/^VM2 applied/p;/^By thread/,/^invalidate/p'; \
	  echo "### Dirty logging in the engine (\`vhost-pci-bench engine --dirty-log\`: without, then with, in one run; 64 B frames)"; echo; \
	  for m in count forward receive; do .build/release/vhost-pci-bench engine --mode $$m --dirty-log | sed 's/^/    /'; done; echo; \
	  if [ -x /usr/bin/dpdk-testpmd ]; then echo; .build/release/vhost-pci-bench dpdk; \
	    echo; .build/release/vhost-pci-bench dpdk --dirty-log --sizes 64,1500 --queues 1; \
	  else echo; echo "(DPDK table skipped: dpdk-testpmd is not installed; make interop-deps)"; fi; \
	  if [ -x /usr/bin/dpdk-testpmd ] && [ -x /usr/bin/qemu-system-x86_64 ] && [ -f .build/linux-guest/vmlinuz ]; then \
	    echo; .build/release/vhost-pci-bench linux-guest; \
	    echo; .build/release/vhost-pci-bench migrate; \
	  else echo; echo "(Linux guest and migration tables skipped: make interop-deps)"; fi; \
	  if [ "$$(id -u)" = 0 ]; then echo; .build/release/vhost-pci-bench scale --label "release build (shared Swift libraries)"; \
	    d=$$(mktemp -d -p $(CURDIR)/.build) && dpkg-deb -x dist/vhost-pci-bridge_$(VERSION)_$$(dpkg --print-architecture).deb $$d && \
	    { echo; .build/release/vhost-pci-bench scale --daemon $$d/usr/bin/vhost-pci-bridged --label "the packaged daemon (the .deb's /usr/bin/vhost-pci-bridged, extracted; issue 24's goals: 1 bridge ≤ 10 MiB, 16 bridges with 100000 mappings ≤ 16 MiB)"; }; rm -rf $$d; \
	  else echo; echo "(Scale tables skipped: they raise vm.max_map_count, which needs root)"; fi; \
	  echo; sh packaging/deb/sizes.sh dist; } > docs/benchmarks.md
	cat docs/benchmarks.md

SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
DOCDIR ?= $(PREFIX)/share/doc/vhost-pci-bridge
MANDIR ?= $(PREFIX)/share/man
DATADIR ?= $(PREFIX)/share
# QEMU looks for vhost-user discovery files in /usr/share/qemu/vhost-user and
# /etc/qemu/vhost-user (not under /usr/local): the package uses the first,
# make install the second.
QEMU_DISCOVERY_DIR ?= $(SYSCONFDIR)/qemu/vhost-user
# Where install-files takes the binaries from (deb: the static build).
RELEASE_DIR ?= .build/release
OPERATOR_BINARIES := vhost-pci-bridged vhost-pci-bridgectl
TOOL_BINARIES := vhost-pci-guest vhost-pci-demo vhost-pci-bench
UNITS := vhost-pci-bridged.service vhost-pci-bridged-metrics.service vhost-pci-bridged-metrics.timer

# What operators run: the daemon and its CLI, the systemd unit (paths under
# $(PREFIX)), QEMU's discovery file, man pages and bash/zsh/fish completions
# generated from the argument parser, the production config template (no
# bridges; an existing /etc/vhost-pci-bridged.yaml is kept) and the docs.
# DESTDIR is honoured. The demo, bench and guest tools: make install-tools.
install: release
	$(SWIFT) build -c release --product generate-manual
	$(MAKE) install-files RELEASE_DIR=.build/release MANUAL_TOOL=.build/release/generate-manual
	$(MAKE) install-lib

# libvhost-pci-device (docs/device-api.md): the shared library (SONAME
# libvhost-pci-device.so.1, the ABI major), the static one, each with the
# Swift runtime linked in (no Swift toolchain needed), the header and the
# pkg-config files (vhost-pci-device, vhost-pci-device-static).
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
install-lib: deps
	$(SWIFT) build -c release --build-path .build-lib --product vhost-pci-device -Xswiftc -static-stdlib -Xlinker -z -Xlinker now $(LIB_EXPORTS)
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 0755 .build-lib/release/libvhost-pci-device.so $(DESTDIR)$(LIBDIR)/libvhost-pci-device.so.1
	strip --strip-unneeded --remove-section=.comment --remove-section=.note $(DESTDIR)$(LIBDIR)/libvhost-pci-device.so.1
	ln -sf libvhost-pci-device.so.1 $(DESTDIR)$(LIBDIR)/libvhost-pci-device.so
	install -m 0644 Sources/CVhostPCIDevice/include/vhost_pci_device.h $(DESTDIR)$(INCLUDEDIR)/vhost_pci_device.h
	SWIFT=$(SWIFT) sh packaging/lib/static-lib.sh .build-lib/release $(DESTDIR)$(LIBDIR)/libvhost-pci-device.a
	$(call pc-files,$(PREFIX),$(LIBDIR),$(INCLUDEDIR),,$(DESTDIR)$(LIBDIR)/pkgconfig)
	chmod 0644 $(DESTDIR)$(LIBDIR)/pkgconfig/vhost-pci-device.pc $(DESTDIR)$(LIBDIR)/pkgconfig/vhost-pci-device-static.pc \
	  $(DESTDIR)$(LIBDIR)/libvhost-pci-device.a

MANUAL_TOOL ?= .build/release/generate-manual
install-files:
	install -d $(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(MANDIR)/man1 \
	  $(DESTDIR)$(QEMU_DISCOVERY_DIR) $(DESTDIR)$(DATADIR)/bash-completion/completions \
	  $(DESTDIR)$(DATADIR)/zsh/vendor-completions $(DESTDIR)$(DATADIR)/fish/vendor_completions.d
	for b in $(OPERATOR_BINARIES); do install -m 0755 $(RELEASE_DIR)/$$b $(BINDIR)/$$b; done
	for u in $(UNITS); do sed -e 's|/usr/local/bin/|$(PREFIX)/bin/|g' -e 's|/etc/vhost-pci-bridged.yaml|$(SYSCONFDIR)/vhost-pci-bridged.yaml|' \
	  -e 's|/usr/local/share/doc/vhost-pci-bridge|$(DOCDIR)|' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; done
	sed -e 's|/usr/local/bin/|$(PREFIX)/bin/|' packaging/qemu/50-vhost-pci-bridged.json > $(DESTDIR)$(QEMU_DISCOVERY_DIR)/50-vhost-pci-bridged.json
	chmod 0644 $(DESTDIR)$(QEMU_DISCOVERY_DIR)/50-vhost-pci-bridged.json
	[ -e $(DESTDIR)$(SYSCONFDIR)/vhost-pci-bridged.yaml ] || install -m 0644 config/production.yaml $(DESTDIR)$(SYSCONFDIR)/vhost-pci-bridged.yaml
	install -m 0644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 config/vhost-pci-bridged.yaml $(DESTDIR)$(DOCDIR)/example-config.yaml
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 0644 docs/examples/libvirt-vm1.xml docs/examples/qemu-vm1.sh $(DESTDIR)$(DOCDIR)/examples/
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && for b in $(OPERATOR_BINARIES); do \
	  $(MANUAL_TOOL) $(RELEASE_DIR)/$$b --date 2026-11-27 --output-directory $$tmp >/dev/null || exit 1; \
	  gzip -9n -c $$tmp/$$b.1 > $(DESTDIR)$(MANDIR)/man1/$$b.1.gz; chmod 0644 $(DESTDIR)$(MANDIR)/man1/$$b.1.gz; \
	  $(RELEASE_DIR)/$$b --generate-completion-script bash | sed '1{/^#!/d}' > $(DESTDIR)$(DATADIR)/bash-completion/completions/$$b; \
	  $(RELEASE_DIR)/$$b --generate-completion-script zsh > $(DESTDIR)$(DATADIR)/zsh/vendor-completions/_$$b; \
	  $(RELEASE_DIR)/$$b --generate-completion-script fish > $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$$b.fish; \
	  chmod 0644 $(DESTDIR)$(DATADIR)/bash-completion/completions/$$b $(DESTDIR)$(DATADIR)/zsh/vendor-completions/_$$b \
	    $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$$b.fish; done

# The demo, benchmark and emulated-guest tools, for a development machine.
install-tools: release
	install -d $(BINDIR)
	for b in $(TOOL_BINARIES); do install -m 0755 .build/release/$$b $(BINDIR)/$$b; done

uninstall:
	for b in $(OPERATOR_BINARIES) $(TOOL_BINARIES); do rm -f $(BINDIR)/$$b $(DESTDIR)$(MANDIR)/man1/$$b.1.gz \
	  $(DESTDIR)$(DATADIR)/bash-completion/completions/$$b $(DESTDIR)$(DATADIR)/zsh/vendor-completions/_$$b \
	  $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$$b.fish; done
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	rm -f $(DESTDIR)$(QEMU_DISCOVERY_DIR)/50-vhost-pci-bridged.json
	rm -rf $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(LIBDIR)/libvhost-pci-device.so.1 $(DESTDIR)$(LIBDIR)/libvhost-pci-device.so $(DESTDIR)$(LIBDIR)/libvhost-pci-device.a \
	  $(DESTDIR)$(LIBDIR)/pkgconfig/vhost-pci-device.pc $(DESTDIR)$(LIBDIR)/pkgconfig/vhost-pci-device-static.pc \
	  $(DESTDIR)$(INCLUDEDIR)/vhost_pci_device.h

# A Debian package of what `make install` installs, from a build with the
# Swift runtime linked in statically (it runs without a Swift toolchain):
# dist/vhost-pci-bridge_VERSION_ARCH.deb. deb-check runs lintian on it,
# installs it into a scratch root and checks the file list and the unit.
deb: deps check-deps
	sh packaging/deb/build.sh dist

deb-check: deb
	sh packaging/deb/check.sh dist

clean:
	rm -rf .build .build-static .build-lib dist
