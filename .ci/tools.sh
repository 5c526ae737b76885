#!/usr/bin/env bash
# The real binaries the tests run (promtool, prometheus, amtool, alertmanager, redis-server,
# systemd-analyze) come from Debian's packages. Those not on PATH are fetched with
# `apt-get download` and unpacked into .tools/: nothing is installed on the host, no service is
# started or enabled, and no root is needed (only current apt lists: `apt-get update`).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools
export PATH="$PWD/$dest/usr/bin:$PWD/$dest/usr/sbin:$PATH"

declare -A package=(
  [promtool]=prometheus [prometheus]=prometheus
  [amtool]=prometheus-alertmanager [prometheus-alertmanager]=prometheus-alertmanager
  [redis-server]="redis-server redis-tools" [systemd-analyze]=systemd
)
wanted=()
for binary in "${!package[@]}"; do
  command -v "$binary" >/dev/null || wanted+=(${package[$binary]})
done
[ ${#wanted[@]} -eq 0 ] && exit 0
# Their libraries, when the host lacks them (only missing ones: none shadows the host's).
declare -A libraries=([redis-tools]="libjemalloc2 liblzf1 libatomic1" [systemd]=libsystemd-shared)
for owner in "${!libraries[@]}"; do
  [[ " ${wanted[*]} " == *" $owner "* ]] || continue
  for lib in ${libraries[$owner]}; do
    dpkg -s "$lib" >/dev/null 2>&1 || wanted+=("$lib")
  done
done
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
echo "unpacking into $dest/: $(printf '%s\n' "${wanted[@]}" | sort -u | xargs)"
if ! (cd "$download" && apt-get download -q $(printf '%s\n' "${wanted[@]}" | sort -u)); then
  echo "apt-get download failed: the apt lists may be missing or old (sudo apt-get update)" >&2
  exit 1
fi
for deb in "$download"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
