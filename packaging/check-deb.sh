#!/usr/bin/env bash
# Builds imgcache's .deb with cargo-deb and checks it on this machine: its control data and
# file list, then a real install (dpkg -i), the installed binary, man page, config, user, cache
# directory and systemd unit (systemd-analyze verify, no warning allowed), a short `serve` as
# the imgcache user with the installed config, then dpkg -r and dpkg --purge.
#
# Run as root, from anywhere in a clone: `sudo packaging/check-deb.sh` (.ci/run runs it after
# the tests). It refuses to run where imgcache is already installed, and leaves the machine as
# it found it (package purged; the imgcache user removed if this script created it).
# Needs: cargo, dpkg, systemd-analyze (Debian's systemd), man (man-db), curl, setpriv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

passed=0
fail() {
    echo "check-deb: $*" >&2
    echo "check-deb: $passed passed, 1 failed" >&2
    exit 1
}
# check WHAT CMD...: CMD must succeed, else the script fails saying WHAT.
check() {
    local what=$1
    shift
    "$@" >/dev/null || fail "$what"
    passed=$((passed + 1))
}
step() { echo "==> $*"; }
timed() {
    local start=$SECONDS
    "$@"
    echo "    ($((SECONDS - start)) s)"
}

[[ $(id -u) -eq 0 ]] || fail "run as root: it installs and removes the package"
if dpkg-query -W -f '${Status}' imgcache 2>/dev/null | grep -q "installed"; then
    fail "imgcache is installed on this machine already; remove it first (dpkg --purge imgcache)"
fi
for tool in dpkg-deb systemd-analyze man curl setpriv; do
    command -v "$tool" >/dev/null || fail "$tool not found"
done

# ---- Build -----------------------------------------------------------------------------
if ! command -v cargo-deb >/dev/null; then
    step "cargo install cargo-deb --locked"
    timed cargo install cargo-deb --locked
fi
cargo deb --version
step "cargo deb -p imgcache (a release build)"
start=$SECONDS
cargo deb -p imgcache >target/debian-build.log 2>&1 || {
    tail -50 target/debian-build.log >&2
    fail "cargo deb failed (log: target/debian-build.log)"
}
echo "    ($((SECONDS - start)) s)"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=$(ls -t target/debian/imgcache_"${version}"-*_*.deb 2>/dev/null | head -1)
check "no .deb for version $version in target/debian/" test -f "$deb"
echo "    $deb ($(du -h "$deb" | cut -f1))"

# ---- What the package says and holds ----------------------------------------------------
step "dpkg-deb --info"
info=$(dpkg-deb --info "$deb")
echo "$info" | sed 's/^/    /'
for field in "Package: imgcache" "Version: ${version}-" "Architecture: $(dpkg --print-architecture)" \
    "Section: admin" "Depends: " "Suggests: qemu-utils"; do
    check "control: no '${field}'" grep -q "^ ${field}" <<<"$info"
done

step "dpkg-deb --contents"
contents=$(dpkg-deb --contents "$deb" | awk '{print $NF}' | sed 's|^\./|/|')
expected=(
    /usr/bin/imgcache
    /etc/imgcache/imgcache.toml
    /usr/lib/systemd/system/imgcache.service
    /usr/share/bash-completion/completions/imgcache
    /usr/share/zsh/vendor-completions/_imgcache
    /usr/share/fish/vendor_completions.d/imgcache.fish
    /usr/share/doc/imgcache/README.md
)
for page in packaging/man/*.1; do
    expected+=("/usr/share/man/man1/$(basename "$page")")
done
for path in "${expected[@]}"; do
    # Man pages may be compressed by the packager.
    check "the .deb has no $path" grep -qx -e "$path" -e "$path.gz" <<<"$contents"
done
echo "    ${#expected[@]} expected paths present ($(wc -l <<<"$contents") entries)"

control=$(mktemp -d)
dpkg-deb --control "$deb" "$control"
check "the config is not a conffile" grep -qx /etc/imgcache/imgcache.toml "$control/conffiles"
check "postinst creates no user" grep -q useradd "$control/postinst"
check "postinst does not enable the unit" grep -q "deb-systemd-helper enable" "$control/postinst"
rm -rf "$control"

# ---- Install -----------------------------------------------------------------------------
user_existed=no
getent passwd imgcache >/dev/null && user_existed=yes
serve_pid=""
cleanup() {
    if [[ -n $serve_pid ]]; then
        kill "$serve_pid" 2>/dev/null || true
    fi
    if dpkg-query -W imgcache >/dev/null 2>&1; then
        dpkg --purge imgcache >/dev/null 2>&1 || true
    fi
    if [[ $user_existed == no ]] && getent passwd imgcache >/dev/null; then
        userdel imgcache 2>/dev/null || true
    fi
}
trap cleanup EXIT

step "dpkg -i $deb"
start=$SECONDS
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb"
echo "    ($((SECONDS - start)) s)"

step "the installed package"
installed_version=$(/usr/bin/imgcache --version)
echo "    $installed_version"
check "imgcache --version says '$installed_version'" test "$installed_version" = "imgcache $version"
check "man imgcache-serve: no page" man -w imgcache-serve
check "no imgcache user" getent passwd imgcache
owner=$(stat -c '%U:%G %a' /var/cache/imgcache)
check "/var/cache/imgcache is $owner" test "$owner" = "imgcache:imgcache 750"
owner=$(stat -c '%U:%G %a' /etc/imgcache/imgcache.toml)
check "/etc/imgcache/imgcache.toml is $owner" test "$owner" = "root:imgcache 640"
check "imgcache.service is not enabled" test -L /etc/systemd/system/multi-user.target.wants/imgcache.service
echo "    user, cache directory, config owner and the enabled unit are in place"

step "systemd-analyze verify /usr/lib/systemd/system/imgcache.service"
verify=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify /usr/lib/systemd/system/imgcache.service 2>&1) ||
    fail "systemd-analyze verify failed: $verify"
check "systemd-analyze verify warns: $verify" test -z "$verify"
echo "    clean"

# What the unit runs, as its user and environment have it (not its sandbox: no systemd runs
# services here): the packaged config, the default cache directory, readiness on stdout.
step "imgcache serve as the imgcache user, with the installed config"
out=$(mktemp)
# setpriv execs (runuser would stay as the parent and SIGKILL serve on SIGTERM).
setpriv --reuid=imgcache --regid=imgcache --init-groups \
    env -i PATH=/usr/bin:/bin XDG_CACHE_HOME=/var/cache \
    /usr/bin/imgcache serve --config /etc/imgcache/imgcache.toml --listen 127.0.0.1:0 \
    >"$out" 2>&1 &
serve_pid=$!
deadline=$((SECONDS + 60))
until addr=$(sed -n 's|^imgcache: serving on http://||p' "$out") && [[ -n $addr ]]; do
    kill -0 "$serve_pid" 2>/dev/null || fail "serve exited: $(cat "$out")"
    ((SECONDS < deadline)) || fail "serve did not start in 60 s: $(cat "$out")"
    sleep 0.1
done
code=$(curl -sS --noproxy '*' --max-time 10 -o /dev/null -w '%{http_code}' "http://$addr/healthz")
check "GET /healthz: $code" test "$code" = 200
kill -TERM "$serve_pid"
wait "$serve_pid" || fail "serve did not stop cleanly on SIGTERM: $(cat "$out")"
serve_pid=""
check "serve did not use /var/cache/imgcache" test -n "$(ls -A /var/cache/imgcache)"
others=$(find /var/cache/imgcache ! -user imgcache)
check "not owned by imgcache: $others" test -z "$others"
echo "    served on $addr, /healthz 200, stopped on SIGTERM; cache in /var/cache/imgcache"
rm -f "$out"

# ---- Remove --------------------------------------------------------------------------------
step "dpkg -r imgcache"
dpkg -r imgcache
check "/usr/bin/imgcache is still there" test ! -e /usr/bin/imgcache
check "dpkg -r removed the conffile" test -f /etc/imgcache/imgcache.toml
step "dpkg --purge imgcache"
dpkg --purge imgcache
check "the config survived the purge" test ! -e /etc/imgcache/imgcache.toml
check "the cache directory survived the purge" test ! -e /var/cache/imgcache
check "the unit is still enabled after the purge" \
    test ! -e /etc/systemd/system/multi-user.target.wants/imgcache.service
echo "check-deb: $passed passed, 0 failed"
