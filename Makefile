# Two commands on a fresh machine: `make run` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test demo lint setup xformers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned here, not in pyproject: 2.13.0 resolves to the local CPU wheel on our machines and to CUDA elsewhere.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	# The embedded default: the shipped shapes-sd model, unpatched vs patched, same seed; then the four tiny families.
	$(VENV)/bin/accel compare --prompt "a red circle and a blue square" --repeats 3 --out outputs/shapes-sd
	for model in sd15-tiny sdxl-tiny flux-tiny hunyuanvideo-tiny; do \
		$(VENV)/bin/accel compare --model $$model --method dense --seed 0 --repeats 3 --out outputs/$$model || exit 1; \
	done

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	# The Gradio demo on http://127.0.0.1:7860 (HOST=0.0.0.0 to serve other machines, PORT to move it).
	$(PY) -m demo --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),7860)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

xformers: $(STAMP)
	# Constrain pip to the installed torch, so an xformers build for another torch fails instead of replacing it.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt "xformers>=0.0.29"

clean:
	rm -rf $(VENV) outputs build *.egg-info
