# `make demo` and `make test` do all set-up on a fresh machine: a .venv with the package and its dev extras.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: install demo test pytest nbtest sync-check readme clean

$(VENV)/.installed: setup.py settings.ini
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fastinfer demo

# notebooks are the source: exporting them must not change fastinfer/, and cleaning must not change nbs/
sync-check: install
	@before=$$(cat fastinfer/*.py nbs/*.ipynb | md5sum); \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean; \
	after=$$(cat fastinfer/*.py nbs/*.ipynb | md5sum); \
	if [ "$$before" != "$$after" ]; then echo "notebooks and fastinfer/ drifted: nbdev-export/nbdev-clean changed:"; git status --porcelain -- fastinfer nbs; exit 1; fi; \
	if [ -n "$$CI" ] && [ -n "$$(git status --porcelain -- fastinfer nbs)" ]; then echo "uncommitted changes after nbdev-export:"; git status --porcelain -- fastinfer nbs; exit 1; fi; \
	echo "notebooks and fastinfer/ are in sync"
	$(PY) .ci/readme.py --check

readme:
	python3 .ci/readme.py

pytest: install
	$(PY) -m pytest

nbtest: install
	FASTINFER_CACHE=0 $(BIN)/nbdev-test  # deterministic: each notebook measures for itself

test: sync-check pytest nbtest

clean:
	rm -rf $(VENV) build *.egg-info
