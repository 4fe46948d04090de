# What the packaging scripts (build.sh, lib.sh) share; sourced from the
# project's root: the version and architecture, the size limits and the
# steps every package goes through.
version=$(sed -n 's/.*static let version = "\(.*\)".*/\1/p' Sources/BridgeCore/BuildInfo.swift)
arch=$(dpkg --print-architecture)
# No Foundation in what the packages install (ICU's data alone is 30 MB).
max_deb=$((10 << 20))
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB, %.1f MiB", b / 1000000, b / 1048576 }'; }
fail() { echo "make deb: $*" >&2; exit 1; }

# report_size FILE: prints its size; fails if it holds ICU (Foundation).
report_size() {
  bytes=$(stat -c %s "$1")
  echo "make deb: $(basename "$1"): $bytes bytes ($(mb "$bytes"))"
  if grep -a -q -e icudt -e _ZN6icu_ -e NSRegularExpression "$1"; then
    fail "$(basename "$1") links ICU (Foundation): what the packages install must link FoundationEssentials at most"
  fi
}

# shlib_depends STAGE PACKAGE FILE...: the Depends dpkg-shlibdeps computes
# for FILE... (it wants a debian/control to read: a minimal one in STAGE);
# fails without libc6 in it.
shlib_depends() {
  s=$1 p=$2
  shift 2
  mkdir -p "$s/src/debian"
  printf 'Source: vhost-pci-bridge\n\nPackage: %s\nArchitecture: any\n' "$p" > "$s/src/debian/control"
  for f in "$@"; do set -- "$@" -e"$f"; shift; done
  (cd "$s/src" && dpkg-shlibdeps -O "$@") > "$s/shlibs" 2> "$s/shlibs.err" || { cat "$s/shlibs.err" >&2; fail "dpkg-shlibdeps failed"; }
  d=$(sed -n 's/^shlibs:Depends=//p' "$s/shlibs")
  case "$d" in *libc6*) ;; *) fail "no libc6 in the computed Depends of $p ('$d')" ;; esac
  echo "$d"
}

# control_and_sums PKGDIR TEMPLATE DEPENDS: DEBIAN/control from TEMPLATE
# (version, architecture, Depends, installed size) and DEBIAN/md5sums.
control_and_sums() {
  install -d "$1/DEBIAN"
  size=$(du -sk --exclude=DEBIAN "$1" | cut -f1)
  sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$3/" -e "s/@SIZE@/$size/" "$2" > "$1/DEBIAN/control"
  (cd "$1" && find . -type f ! -path './DEBIAN/*' -printf '%P\n' | LC_ALL=C sort | xargs md5sum > DEBIAN/md5sums)
}

# build_deb PKGDIR DEB [NOTE]: the package, within the size limit.
build_deb() {
  find "$1" -path "$1/DEBIAN/*" -type f -exec chmod 0644 {} +
  find "$1" -type d -exec chmod 0755 {} +
  mkdir -p "$(dirname "$2")"
  fakeroot dpkg-deb --build -Zxz "$1" "$2" >/dev/null
  bytes=$(stat -c %s "$2")
  [ "$bytes" -le "$max_deb" ] || fail "$2 is $bytes bytes, more than the limit of $max_deb ($(mb "$max_deb"))"
  echo "built $2 ($bytes bytes, $(mb "$bytes")${3:+; $3})"
}
