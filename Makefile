# relaycrypt: one-command setup. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  := .cache

.PHONY: venv test demo latency lint bench clean distclean tornet

venv: $(STAMP)

# Rebuilt only when something it depends on changed: fast when nothing did.
$(STAMP): pyproject.toml setup.py tools/build_pyuv.py tools/setup_system.sh $(wildcard tor1/_kernel/*.c) $(wildcard relay/_ntor/*.c) $(wildcard relay/_cells/*.c) $(wildcard relay/_tls/*.c)
	bash tools/setup_system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "setuptools>=77" wheel
	$(PY) -m pip install --quiet --force-reinstall --no-deps "$$($(PY) tools/build_pyuv.py --cache $(CACHE)/pyuv)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,dev]"
	$(PY) setup.py --quiet build_ext --inplace
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m examples.network --compare-pure --compare-plain

latency: venv
	$(PY) -m examples.wakeup_latency

# A private Tor network of real tor processes (authority, relays, client) with external relays
# in every position; needs Debian's tor (tools/install_tor.sh). TORNET_ARGS: e.g. --size 64.
TORNET_ARGS ?=
tornet: venv
	$(PY) -m examples.tornet $(TORNET_ARGS)

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.scaling
	$(PY) -m examples.wakeup_latency

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CACHE)

# Reliability (docs/reliability.md). `make fuzz`: the suite's fuzz tests with many more examples
# (FUZZ_EXAMPLES per test); `make soak`: the relay network under back-to-back rounds for
# SOAK_MINUTES, checking each relay's RSS, threads and open fds stay flat.
# With atheris importable (pip install atheris), `make fuzz` also runs ATHERIS_RUNS
# coverage-guided executions of tools/fuzz_atheris.py.
FUZZ_EXAMPLES ?= 5000
ATHERIS_RUNS  ?= 1000000
SOAK_MINUTES  ?= 3
.PHONY: fuzz soak

fuzz: venv
	RELAYCRYPT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
		--timeout 7200 --hypothesis-show-statistics \
		tests/test_fuzz_codec.py tests/test_fuzz_link.py tests/test_fuzz_relay.py
	@if $(PY) -c "import atheris" 2>/dev/null; then \
		$(PY) tools/fuzz_atheris.py -runs=$(ATHERIS_RUNS) -print_final_stats=1; \
	else echo "fuzz: atheris is not installed: coverage-guided run skipped"; fi

soak: venv
	$(PY) -m examples.soak --minutes $(SOAK_MINUTES)
