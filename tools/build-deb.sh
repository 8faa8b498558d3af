#!/usr/bin/env bash
# Build the Debian package on Debian 13 (trixie) or newer, as root: OUTDIR/capsuled_VERSION_all.deb
# (default OUTDIR: dist/ in the checkout), then run lintian on it and fail on its errors.
#
#   tools/build-deb.sh [OUTDIR]
#
# Installs the build dependencies (debian/control) and lintian with apt when some are missing;
# where all are present (the testbed's build root, which has no network) apt is not called.
# Builds from a copy of the tree, so the checkout (possibly read-only, as in the testbed) gets no
# build/, .pybuild/ or debian/capsuled/. `make deb` runs this directly on Debian 13, and inside
# a trixie container (python3 -m testbed deb) on older hosts.
set -euo pipefail

checkout=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$checkout/dist}")

. /etc/os-release
if [ "${ID:-}" != debian ] || { [ -n "${VERSION_ID:-}" ] && [ "${VERSION_ID%%.*}" -lt 13 ]; }; then
    echo "build-deb: needs Debian 13 or newer (this is ${PRETTY_NAME:-unknown}); use make deb" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "build-deb: run as root (installs build dependencies)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! dpkg-checkbuilddeps "$checkout/debian/control" 2>/dev/null || ! command -v lintian >/dev/null; then
    echo "build-deb: installing build dependencies"
    apt-get update -qq
    apt-get build-dep -y -qq --no-install-recommends "$checkout"
    apt-get install -y -qq --no-install-recommends lintian
fi

work=$(mktemp -d /var/tmp/capsuled-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src="$work/capsuled"
mkdir "$src"
# The tree as committed or edited, without caches and earlier builds.
tar -C "$checkout" -c \
    --exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.hypothesis --exclude=.benchmarks --exclude=./.pybuild \
    --exclude=./debian/capsuled --exclude=./debian/.debhelper --exclude=./debian/tmp . |
    tar -C "$src" -x

started=$(date +%s)
(cd "$src" && dpkg-buildpackage --build=binary --no-sign) >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (last lines above)" >&2
    exit 1
}
echo "build-deb: dpkg-buildpackage took $(($(date +%s) - started)) s"

changes=("$work"/capsuled_*.changes)
debs=("$work"/capsuled_*_all.deb)
echo "build-deb: lintian ${debs[0]##*/}"
# --fail-on error: warnings are reported (and listed in the report of issue 15), errors fail.
lintian --allow-root --fail-on error --info --display-info --pedantic "${changes[0]}" | tee "$work/lintian.log"
mkdir -p "$out"
cp "${debs[0]}" "$work/lintian.log" "$out/"
echo "build-deb: $out/${debs[0]##*/}"
