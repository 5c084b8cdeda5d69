# medclf-node: `make run` serves the node with the shipped default config and model;
# `make test` installs everything the tests need (Debian tools too) and runs the suite
# inside a loopback-only network namespace (tools/netns-loopback).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= deploy/medclf-node.toml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP_FLAGS ?= -q --disable-pip-version-check
PYTEST_ARGS ?=
# OHIF Viewer 3 for the viewer test and tools/viewer.sh: npm @ohif/app's built dist/, pinned by
# version and by the tarball's SHA-1 (npm's "shasum"), cached under .cache/ohif (gitignored).
OHIF_VERSION ?= 3.13.2
OHIF_SHA1 ?= 26a51ffcc1704c30fff403258a1d7392e9a991f3
OHIF_DIR := .cache/ohif/$(OHIF_VERSION)

.PHONY: run test system-deps viewer-deps viewer lint bench clean

$(VENV)/.node-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.all-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[tf,train,test]'
	touch $(VENV)/.node-installed $@

run: $(VENV)/.node-installed
	$(VENV)/bin/medclf-node serve --config $(CONFIG)

system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	$(MAKE) --no-print-directory viewer-deps

viewer-deps: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html:
	rm -rf $(OHIF_DIR) && mkdir -p $(OHIF_DIR)
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	echo "$(OHIF_SHA1)  $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz" | sha1sum -c --quiet
	tar -xzf $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIR) --strip-components=1 package/dist
	rm $(OHIF_DIR)/ohif-app-$(OHIF_VERSION).tgz

# OHIF + Orthanc (DICOMweb) on this machine, for looking at results: see README "Viewing results".
viewer: system-deps $(VENV)/.all-installed
	tools/viewer.sh

# pytest runs in a loopback-only network namespace (Orthanc binds all interfaces; installs stay
# outside it); MEDCLF_REQUIRE_ORTHANC=1 makes the Orthanc round trip fail rather than skip, and
# MEDCLF_REQUIRE_VIEWER=1 the OHIF viewer test (tests/test_viewer_ohif.py).
# The tests run in one pytest-xdist worker (-n 1): a native crash (a TensorFlow kernel that
# segfaults on this CPU) fails that test with its signal (tests/native_crash.py), a new worker
# takes over and the suite reaches its summary.
PG_TESTS = tests/test_intake_index.py tests/test_intake_completion.py tests/test_intake_spool.py tests/test_outbox.py \
	tests/test_retention.py tests/test_result_versions.py tests/test_result_versions_pacs.py tests/test_pipeline.py \
	tests/test_intake_net.py tests/test_faults.py tests/test_cli_peers.py

test: system-deps $(VENV)/.all-installed
	$(VENV)/bin/ruff check medclf_node training tests benchmarks
	$(VENV)/bin/mypy
	MEDCLF_REQUIRE_ORTHANC=1 MEDCLF_REQUIRE_VIEWER=1 MEDCLF_REQUIRE_POSTGRES=1 tools/netns-loopback $(PY) -m pytest -n 1 --max-worker-restart 20 $(PYTEST_ARGS)
	# second pass: the tests that touch the store, on a throwaway PostgreSQL 15 (tests/pg.py)
	MEDCLF_TEST_STORE=postgresql MEDCLF_REQUIRE_POSTGRES=1 tools/netns-loopback $(PY) -m pytest -n 1 --max-worker-restart 20 $(PG_TESTS)

bench: $(VENV)/.all-installed
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
