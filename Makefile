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

# The README's commands, end to end on the synthetic set (configs/preset/demo.yaml).
demo: install
	$(PY) -m tokenizers.train vavae preset=demo
	$(PY) -m latents.extract --tokenizer $(DEMO)/vavae/tokenizer --data synthetic --out $(DEMO)/latents.zarr
	$(PY) -m generators.train --latent demo preset=demo
	$(PY) -m generators.sample --run $(DEMO)/generator --num 500 --out $(DEMO)/samples_guided.npz
	$(PY) -m generators.sample --run $(DEMO)/generator --num 500 --out $(DEMO)/samples_unguided.npz sample.cfg_scale=1.0
	$(PY) -m eval.demo_report --tokenizer-run $(DEMO)/vavae --generator-run $(DEMO)/generator \
		--guided $(DEMO)/samples_guided.npz --unguided $(DEMO)/samples_unguided.npz --out $(DEMO)/report.html
	@echo "report: $(DEMO)/report.html"

clean:
	rm -rf runs .pytest_cache
