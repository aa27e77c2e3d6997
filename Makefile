# Each target builds its own virtual environment from the project's files alone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
DEMO_PATIENTS ?= 24
REPORT ?= short

.PHONY: demo ui test lint bench gpu-bench venv clean-data snapshot

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,k8s]'
	touch $@

demo: venv  ## generate the demo data if absent, materialize every asset, print a summary (REPORT=quick or full: a longer study)
	$(BIN)/nodule-pipeline demo --data-dir $(DATA_DIR) --patients $(DEMO_PATIENTS) --report $(REPORT)

ui: venv  ## the Dagster UI on the same instance (http://127.0.0.1:3000)
	$(BIN)/nodule-pipeline ui --data-dir $(DATA_DIR)

test: venv  ## the whole test suite
	$(BIN)/python -m pytest

snapshot: venv  ## after a deliberate change of assets, checks, jobs, schedules or sensors: rewrite the snapshot the tests compare with
	NODULE_PIPELINE_UPDATE_SNAPSHOT=1 $(BIN)/python -m pytest -q nodule_pipeline_tests/test_definitions.py -k snapshot
	git diff --stat -- nodule_pipeline_tests/snapshots

bench: venv  ## benchmarks (ingestion vs pylidc, search vs FAISS, training): bench-out/bench.{json,md}; BENCH=full adds 10^7 items
	$(BIN)/nodule-pipeline bench --out bench-out $(if $(filter full,$(BENCH)),,--quick)

gpu-bench: venv  ## the GPU path on a CUDA machine (ROIS=table.parquet): training, encoding and search figures in bench-out/gpu.json
	mkdir -p bench-out
	$(BIN)/python -m nodule_pipeline.benchmarks.gpu $(ROIS) --out bench-out/gpu.json

lint: venv
	$(BIN)/ruff check nodule_pipeline nodule_pipeline_tests
	$(BIN)/ruff format --check nodule_pipeline nodule_pipeline_tests

clean-data:
	rm -rf $(DATA_DIR)/artefacts $(DATA_DIR)/dagster $(DATA_DIR)/settings.json
