#!/usr/bin/env bash
# Download the ONNX Runtime C/C++ headers (Debian trixie's libonnxruntime-dev,
# ORT 1.21 / API 21) into DEST without touching the system's apt state.
#
#   fetch_ort_headers.sh DEST
#
# On success DEST/usr/include/onnxruntime/onnxruntime_cxx_api.h exists.
# Needs apt-get, dpkg and network access to the Debian mirror named in
# /etc/apt/sources.list.d/debian.sources (or /etc/apt/sources.list).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DEST" >&2
  exit 2
fi
DEST=$1
HDR=usr/include/onnxruntime/onnxruntime_cxx_api.h
if [[ -f "$DEST/$HDR" ]]; then
  exit 0
fi
for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "fetch_ort_headers: '$tool' not found (not a Debian/Ubuntu system?)" >&2; exit 1; }
done

mkdir -p "$DEST"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fptq_ort_hdr.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/sources.list.d" "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/deb"

# Derive one trixie entry from the system's Debian mirror.
URI="" KEYRING=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
  # First stanza whose URI is a plain (non-security) Debian archive.
  URI=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  KEYRING=$(awk '/^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
elif [[ -f /etc/apt/sources.list ]]; then
  URI=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
fi
URI=${URI:-http://deb.debian.org/debian}
KEYRING=${KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
cat > "$WORK/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: $URI
Suites: trixie
Components: main
Signed-By: $KEYRING
SRC

APT_OPTS=(
  -o "Dir::Etc::SourceList=/dev/null"
  -o "Dir::Etc::SourceParts=$WORK/sources.list.d"
  -o "Dir::State::Lists=$WORK/lists"
  -o "Dir::Cache=$WORK/cache"
  -o "Dir::State::status=/dev/null"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
  -q
)
echo "fetch_ort_headers: apt-get update (trixie, $URI) into $WORK" >&2
apt-get "${APT_OPTS[@]}" update >&2
(cd "$WORK/deb" && apt-get "${APT_OPTS[@]}" download libonnxruntime-dev >&2)
DEB=$(ls "$WORK"/deb/libonnxruntime-dev_*.deb | head -n 1)
dpkg -x "$DEB" "$DEST"
if [[ ! -f "$DEST/$HDR" ]]; then
  echo "fetch_ort_headers: $DEB did not contain $HDR" >&2
  exit 1
fi
echo "fetch_ort_headers: headers in $DEST/usr/include/onnxruntime" >&2
