#!/usr/bin/env bash
# Install what building, testing and the demo need, on Debian 12 (bookworm) or 13 (trixie), as
# root. Quick and quiet when everything is already there: apt and pip are only called for what is
# missing, so `make test` can depend on it.
#
# Python packages go into the interpreter named by $PYTHON (default: python3 on PATH). For a
# Debian system Python that is marked EXTERNALLY-MANAGED (PEP 668) we pass
# --break-system-packages: this is a build/test machine, and pip puts the packages under
# /usr/local, beside (not over) Debian's own. A virtualenv works as well: make PYTHON=venv/bin/python.
set -euo pipefail

PYTHON=${PYTHON:-python3}

# debootstrap + systemd-container: the testbed; libsystemd-dev pkg-config gcc python3-dev: building
# systemd-python (sdist only); util-linux: nsenter/setpriv; git: the checkout;
# systemd-journal-remote: writes real journal files for the journal reader's unit tests.
# zsh fish: the completion tests run them; groff-base man-db: the manual page tests render with
# groff and `man --warnings`, as lintian does.
APT_PACKAGES=(debootstrap systemd-container util-linux mount libsystemd-dev pkg-config gcc
              python3-dev python3-pip git make systemd-journal-remote
              zsh fish groff-base man-db)
# Python: what capsuled imports at run time (pyproject.toml's dependencies), then its `test`
# extra, then the linters and the wheel build's backend and its docutils, which renders the
# manual pages (pyproject.toml build-system).
PIP_PACKAGES=(jeepney systemd-python
              varlink cryptography pytest hypothesis
              ruff mypy "setuptools>=61" wheel "docutils>=0.17")
PY_MODULES="jeepney, systemd.daemon, varlink, cryptography, pytest, hypothesis, ruff, mypy, setuptools, wheel, docutils"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: run as root (the testbed needs debootstrap, mount and systemd-nspawn)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null)" != "ii " ]; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! "$PYTHON" -c "import $PY_MODULES" 2>/dev/null; then
    flags=(--quiet --disable-pip-version-check --root-user-action=ignore)
    if "$PYTHON" - <<'PY'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marked = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if marked and not in_venv else 1)
PY
    then
        flags+=(--break-system-packages)
    fi
    echo "install-deps: $PYTHON -m pip install ${PIP_PACKAGES[*]}"
    "$PYTHON" -m pip install "${flags[@]}" "${PIP_PACKAGES[@]}"
fi
