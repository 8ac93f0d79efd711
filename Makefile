# lightclient: `make demo` and `make test` do all set-up on a fresh Debian 12 / Raspberry Pi OS machine.
# System packages are installed only when missing (as root, or through sudo).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Build: compiler + OpenSSL headers. Lab and tests: SoftHSM2, the libp11 engine, OpenSC tools,
# mosquitto, the openssl CLI, curl, valgrind (shim memory checks); the software TPM chain: swtpm + tpm2-abrmd on a private D-Bus,
# tpm2-pkcs11 (+ tpm2_ptool) and the tpm2-openssl provider; tinyproxy (HTTP CONNECT) and microsocks (SOCKS5)
# for the proxy tests; chromium (the emulator dashboard's browser test).
APT_PACKAGES := gcc libc6-dev libssl-dev libffi-dev openssl ca-certificates curl valgrind \
                softhsm2 libengine-pkcs11-openssl opensc mosquitto mosquitto-clients \
                swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 tpm2-abrmd libtss2-tcti-tabrmd0 dbus \
                libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-openssl tinyproxy microsocks chromium

.PHONY: all demo test test-matrix unit bench bench-smoke system-deps venv shim clean

all: venv

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo ">> installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo ">> installing python3-venv"; DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }

# The stamp is redone when packaging or the C shim changes, so the shim is always rebuilt.
$(VENV)/.installed: setup.cfg setup.py pyproject.toml native/lc_shim.c native/lc_shim.h native/build_shim.py | system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Only this interpreter's shim: the Python matrix's shims (other ABI tags) lie beside it.
	@rm -f lightclient/_shim$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
	$(PY) -m pip install -q -e '.[test,token]'
	@touch $@

venv: system-deps $(VENV)/.installed

demo: venv
	$(PY) examples/demo.py

# The Device integration tests run a second time with paho's stock PUBACK handling (lightclient/_fastpath.py
# is only used where the installed paho allows it; both paths must pass). About 1-2 minutes more.
STOCK_PAHO_TESTS = tests/integration/test_device.py tests/integration/test_device_emulator.py \
	tests/integration/test_device_telemetry.py tests/integration/test_reliability.py

test: venv
	$(PY) -m pytest -q
	LIGHTCLIENT_TEST_STOCK_PAHO=1 $(PY) -m pytest -q $(STOCK_PAHO_TESTS)

bench: venv
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run.py

bench-smoke: venv
	$(PY) benchmarks/run.py --smoke

unit: venv
	$(PY) -m pytest -q tests/unit

# The unit suite and the SoftHSM/emulator integration tests on every CPython 3.9-3.13 present (pyenv),
# each in its own .venv-matrix/3.X with its own shim; prints a table, fails if any present version fails.
test-matrix: system-deps
	$(PYTHON) tools/python_matrix.py

clean:
	rm -rf $(VENV) build *.egg-info lightclient/_shim*.so .pytest_cache
