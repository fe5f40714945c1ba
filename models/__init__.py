"""The model registry: which models ship, and their verified safetensors cache on this machine.

Below every other package (it imports none of ours), so the engine, the guard export and the
benchmarks all name and find models one way. Import the module you need; this file imports
nothing, so `models.packaged` stays free of torch:

- `models.packaged`: PackagedModel, PACKAGED_MODELS, DEFAULT_MODEL..., find_packaged_model;
- `models.errors`: ModelNotFoundError, ChecksumError, DamagedModelError;
- `models.wheels`: the installed wheels' GGUF parts, assembled and checked against their sha256;
- `models.convert`: GGUF -> HF safetensors folder;
- `models.verify`: the cache's recorded checksums (manifest) and file checks;
- `models.cache`: where a cache lives, building it once, verifying or rebuilding it;
- `models.lock`: a cross-process file lock;
- `models.tiny`: the tiny random test model; `models.eos`: the extra tokens that end code;
- `python -m models --prepare [--model ...]` / `--print-wheels` (`models.cli`).
"""
