# Two entry points: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo copy-demo install lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@# Keep a torch the user already has (a CUDA build, say); add the pinned CPU wheel only when none is importable.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest

# The main job: train Multi30k en->de on the CPU (about 10 minutes on 2 cores), score test_2016_flickr
# with sacreBLEU, translate a few sentences with beam search. runs/demo is the demo's own scratch
# directory and is replaced on each run.
DEMO_RUN := runs/demo
VASWANI := $(VENV)/bin/vaswani

demo: install
	rm -rf $(DEMO_RUN)
	$(VASWANI) train configs/demo.toml --run-dir $(DEMO_RUN)
	$(VASWANI) evaluate $(DEMO_RUN)
	$(VASWANI) translate $(DEMO_RUN) --beam 4 \
		"A little girl is climbing into a wooden playhouse." \
		"Two men are playing football in the park." \
		"A woman in a red jacket is riding a bicycle down the street."
	@echo
	@echo "Run directory: $(DEMO_RUN)  (metrics.jsonl, plots/*.png, results_test.json, hypotheses_test.txt, checkpoints/)"

copy-demo: install
	$(PY) -m vaswani.copy_task

lint: install
	$(PY) -m ruff check src tests benchmarks

format: install
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
