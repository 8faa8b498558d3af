# capsuled: developer entry points, on Debian 12 or 13; see README.md. `check` and `lint` need
# neither root nor a network (the tools must already be installed); the others run as root.
#
#   make check   the inner loop: lint, unit, protocol and contract tests (no apt, no pip, no testbed)
#   make lint    ruff check + ruff format --check + mypy --strict
#   make demo    install what is needed, build the testbed, run the narrated walkthrough
#   make test    install what is needed, lint, then every test (unit, protocol, e2e)
#   make shell   an interactive shell as alice inside a fresh testbed (AS=bob for another user)
#   make boot    boot the testbed once, reboot it, print the cold/warm times
#   make bench   benchmarks against the systemd commands doing the same (tables, ratios)
#   make deb     dist/capsuled_VERSION_all.deb (on Debian 13; in a trixie container elsewhere)
#   make load    the load proof in full: 500 hostile connections for 60 s, p99 bound asserted
#   make faults  the fault proof in full: 100 SIGKILLed calls, polkitd, reexec, disk, journald
#   make fuzz    the fuzz proof in full: 100,000 generated messages as a user who owns nothing
#   make clean-cache   forget the cached root filesystem (the next run rebuilds it, ~1 min)

PYTHON ?= python3
# Plain "=": make has a built-in AS (the assembler); `make shell AS=bob` still overrides it.
AS = alice
# `python3 -m testbed` lives in tests/; pytest itself reads its paths from pyproject.toml.
TESTBED := PYTHONPATH=tests:helper:client $(PYTHON) -m testbed
CACHE ?= /var/cache/capsuled-testbed

.PHONY: deps test check lint demo shell boot rootfs clean-cache bench deb load faults fuzz

deps:
	@PYTHON=$(PYTHON) tools/install-deps.sh

test: deps
	@$(MAKE) --no-print-directory lint
	$(PYTHON) -m pytest tests -ra

# No `deps` here: install-deps.sh needs root (apt, the testbed's tools); these need only Python.
check: lint
	$(PYTHON) -m pytest tests/unit tests/protocol tests/contract -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy --strict helper client tests

demo: deps
	$(TESTBED) demo

shell: deps
	$(TESTBED) shell --user $(AS)

bench: deps
	$(PYTHON) bench/run.py

# The proofs of issue 11 at full size (CI runs a slice of each in `make test`; see their
# docstrings in tests/e2e/test_load.py, test_faults.py, test_fuzz.py for what they assert).
PROOF := CI=true $(PYTHON) -m pytest -s -ra -p no:cacheprovider

load: deps
	CAPSULED_LOAD_SECONDS=60 CAPSULED_LOAD_LATENCY_BOUND=1 $(PROOF) tests/e2e/test_load.py

faults: deps
	CAPSULED_FAULT_RUNS=100 $(PROOF) tests/e2e/test_faults.py

fuzz: deps
	CAPSULED_FUZZ_MESSAGES=100000 $(PROOF) tests/e2e/test_fuzz.py

boot: deps
	$(TESTBED) boot

rootfs: deps
	$(TESTBED) build

deb: deps
	$(TESTBED) deb --out dist

clean-cache:
	rm -rf $(CACHE)
