#!/usr/bin/env bash
# The real binaries the tests run (promtool, prometheus, amtool, alertmanager, redis-server,
# systemd-analyze) come from Debian's packages. Those not on PATH are fetched with
# `apt-get download` and unpacked into .tools/: nothing is installed on the host, no service is
# started or enabled, and no root is needed (only current apt lists: `apt-get update`), but for
# alertmanager's templates (below).
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

# Debian's alertmanager reads its templates (default.tmpl, email.tmpl) from a folder built into
# it: unpacked ones are copied there when the host has none (needs root, as CI is).
templates=usr/share/prometheus/alertmanager
place_templates() {
  for file in "$dest/$templates"/*.tmpl; do
    [ -f "$file" ] && [ ! -e "/$templates/${file##*/}" ] || continue
    install -D -m 644 "$file" "/$templates/${file##*/}" ||
      echo "could not write /$templates: alertmanager will not start (run as root)" >&2
  done
}
if [ ${#wanted[@]} -eq 0 ]; then place_templates; exit 0; fi
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
place_templates
