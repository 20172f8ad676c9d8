# p2v: `make demo` and `make test` work on a fresh Debian machine as root.
SHELL := /bin/bash
# The distribution's Python where there is one: Debian builds it with PGO and LTO, and under
# it p2v starts in 0.12 s instead of 0.15 s under a plain source build such as pyenv's (the
# numpy import alone: 94 ms against 112). Expanded when used, after system-deps ran.
PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,python3)
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := $(shell grep -v '^\s*\#' .ci/apt-packages.txt | xargs)
PYTEST_ARGS ?=

.PHONY: deps system-deps python-deps test lint demo bench fuzz clean

deps: system-deps python-deps

# Install only what is missing; `apt-get update` once, before the first install.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat: a plain path entry (the default editable finder costs ~25 ms at every p2v
	# start); setuptools calls that mode transitional, so fall back to the default
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat \
	  || $(BIN)/pip install -q -e '.[test]'
	# libguestfs's Python binding comes from Debian (python3-guestfs), not PyPI: the venv
	# sees that one module through a directory of links, not all of dist-packages
	mkdir -p $(VENV)/system-guestfs
	ln -sf /usr/lib/python3/dist-packages/guestfs.py /usr/lib/python3/dist-packages/libguestfsmod.*.so $(VENV)/system-guestfs/
	echo "$(abspath $(VENV))/system-guestfs" > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/system-guestfs.pth
	touch $@

python-deps: $(BIN)/.installed

lint: python-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy formats live_migrate
	# the agent runs on the server's own Python: 2.6 (RHEL 6), 2.7 and 3.x
	$(BIN)/vermin -t=2.6- -t=3.0- --no-tips --violations p2v/agent.py

test: deps lint
	# worksteal: the guest tests take minutes each; an idle worker takes them over instead of
	# waiting while the other runs out the queue it was dealt
	$(BIN)/pytest -q -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS)

demo: deps
	$(BIN)/python samples/demo.py

bench: deps
	$(BIN)/python tests/bench/run_all.py

fuzz: deps
	P2V_FUZZ_SECONDS=600 $(BIN)/pytest -q tests/fuzz

clean:
	rm -rf $(VENV) samples/build demo-out .pytest_cache .ruff_cache .mypy_cache
