"""Export (model, GenGuard) as one model folder that vLLM loads as is.

    python -m guard.export --model default --guard default      # prints the folder (cached)

GenGuard's stop head only matters through the difference of its two logits,
p_stop = sigmoid((w_stop - w_continue) . h + (b_stop - b_continue)), and its done head is one
row, p_done = sigmoid(w_done . h + b_done). Both read the same normed last hidden state h as the
LM head, so they are written as extra rows of the LM head: vLLM's own logits matmul computes
them at no extra kernel cost, and `guard.vllm_processor` (a vLLM v1 logits processor) reads
those columns, applies the stop policy and masks them so they are never sampled.

Five rows are used, the last five of the head: the stop row, the done row, and three *marker*
rows, tokens the processor forces to end a sequence. The marker says what the guard kept:
  - DROP_OPEN: the line being written is excess; keep the output up to the last line end;
  - DROP_ENDED: the line that the last emitted token ended is excess too (a stop decided after
    that line end was emitted);
  - KEEP: keep everything before the marker (the done rule: the expected code just ended).
The markers are added to `generation_config.json`'s `eos_token_id`, so vLLM ends a sequence on
them in every entry point (LLM, the OpenAI server, Ray Serve LLM, Ray Data LLM) and reports the
marker as the request's `stop_reason`: a guard stop stays distinguishable from EOS.

Rows past the tokenizer's vocabulary are never produced by it and are used when there are five
(the Hub tokenizer of Qwen2.5-Coder-0.5B has 151,665 tokens for 151,936 rows). Otherwise the head
(and embedding, and `vocab_size`) gets longer, rounded up to a multiple of 64: the tokenizer of
the default model, converted from its GGUF, names every row (`[PAD151665]`...), so its head
grows to 152,000 rows (+0.04% of the logits matmul).

The guard rows are scaled by 2**-10 (exact in any float format): their raw logits stay near 0,
far below the vocabulary's, so they take no visible mass from raw logprobs and never show in a
top-k list; the processor scales them back.
"""
from __future__ import annotations

import argparse
import enum
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from guard.policy import PolicyError, StopPolicy
from guard.probe import CONTINUE_INDEX, STOP_INDEX, GenGuard, GuardMismatchError, model_slug, shipped_guard_dir
from guard.token_table import TABLE_FILE, TokenTable

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
META_FILE = "genguard_vllm.json"
NUM_GUARD_ROWS = 5  # stop, done, and three markers
GUARD_LOGIT_SCALE = 2.0 ** -10
VOCAB_PAD_MULTIPLE = 64
WEIGHT_SUFFIXES = (".safetensors",)
INDEX_FILE = "model.safetensors.index.json"


class MarkerKind(enum.IntEnum):
    """Offsets of the marker rows after the done row; see the module docstring."""

    DROP_OPEN = 0
    DROP_ENDED = 1
    KEEP = 2


class ExportError(ValueError):
    """A model or guard that cannot be exported, or a folder that is not a usable export."""


@dataclass(frozen=True)
class GuardExport:
    """What the logits processor and the backends need, read from `META_FILE` in the folder."""

    model_name: str
    guard_sha256: str
    stop_row: int
    done_row: int | None  # None: the guard has no done head
    marker_ids: tuple[int, int, int]  # indexed by MarkerKind
    logit_scale: float
    stop_bias: float  # b_stop - b_continue
    done_bias: float
    policy: StopPolicy
    eos_token_ids: tuple[int, ...]
    num_tokenizer_ids: int
    vocab_size: int
    format_version: int = EXPORT_FORMAT_VERSION

    def marker_id(self, kind: MarkerKind) -> int:
        return self.marker_ids[int(kind)]

    def marker_kind(self, token_id: int | None) -> MarkerKind | None:
        return MarkerKind(self.marker_ids.index(token_id)) if token_id in self.marker_ids else None

    def kept_ids(self, token_ids: list[int], stop_reason, is_line_end) -> list[int] | None:
        """The output a guard stop keeps, from vLLM's output ids and its `stop_reason`; None when
        the sequence did not end on a marker. `is_line_end`: the token table's column."""
        kind = self.marker_kind(stop_reason)
        if kind is None:
            return None
        body = list(token_ids[:-1]) if token_ids and token_ids[-1] == stop_reason else list(token_ids)
        if kind is MarkerKind.KEEP:
            return body
        end = len(body) - (1 if kind is MarkerKind.DROP_ENDED else 0)
        return body[:last_line_end(body, end, is_line_end)]

    def stop_index(self, token_ids: list[int], stop_reason) -> int | None:
        """Index of the token whose vote stopped the sequence, as `find_stop` counts it: the
        marker's own place for a stop decided before the token was emitted (DROP_OPEN), else the
        token before the marker."""
        kind = self.marker_kind(stop_reason)
        if kind is None:
            return None
        num_body = len(token_ids) - (1 if token_ids and token_ids[-1] == stop_reason else 0)
        return num_body if kind is MarkerKind.DROP_OPEN else num_body - 1

    @property
    def first_guard_row(self) -> int:
        return self.stop_row

    def to_json(self) -> dict:
        return {**asdict(self), "policy": self.policy.to_json()}

    @classmethod
    def load(cls, folder: str | Path) -> "GuardExport":
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise ExportError(
                f"{folder} holds no GenGuard export ({META_FILE} is missing): build one with"
                f" `python -m guard.export --model MODEL --guard GUARD` and serve the folder it prints")
        try:
            meta = json.loads(path.read_text())
            if meta.get("format_version") != EXPORT_FORMAT_VERSION:
                raise ExportError(f"{path}: export format {meta.get('format_version')!r}, this code"
                                  f" reads {EXPORT_FORMAT_VERSION}; rebuild with `python -m guard.export`")
            meta["policy"] = StopPolicy.from_json(meta["policy"])  # the rule guard.json is held to
            for name in ("logit_scale", "stop_bias", "done_bias"):  # a NaN would silence the guard
                if not math.isfinite(meta[name]):
                    raise ExportError(f"{path}: field {name!r} must be a finite number, got {meta[name]!r};"
                                      " rebuild it with `python -m guard.export`")
            meta["marker_ids"] = tuple(meta["marker_ids"])
            meta["eos_token_ids"] = tuple(meta["eos_token_ids"])
            return cls(**meta)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ExportError):
                raise
            if isinstance(exc, PolicyError):
                raise ExportError(f"{path}: field {exc.json_field!r} {exc.problem}; rebuild it with"
                                  " `python -m guard.export`") from exc
            raise ExportError(f"{path} is not a valid GenGuard export ({type(exc).__name__}: {exc});"
                              " rebuild it with `python -m guard.export`") from exc


def last_line_end(token_ids: list[int], end: int, is_line_end) -> int:
    """Index after the last token holding a newline among token_ids[:end] (0 if none)."""
    for i in range(end - 1, -1, -1):
        if 0 <= token_ids[i] < len(is_line_end) and is_line_end[token_ids[i]]:
            return i + 1
    return 0


# ---- building ------------------------------------------------------------------------------------
def export_cache_root() -> Path:
    default = Path.home() / ".cache" / "codefast" / "vllm-exports"
    return Path(os.environ.get("CODEFAST_EXPORT_DIR") or default).expanduser()


def resolve_model_folder(model: str) -> tuple[Path, str]:
    """(local HF folder, model name) for a packaged model ("default", ...), the tiny test model or
    a local folder."""
    from models.cache import ensure_model_cache
    from models.packaged import find_packaged_model
    from models.tiny import TINY_MODEL_NAME

    packaged = find_packaged_model(model)
    if packaged is not None:
        return ensure_model_cache(packaged), packaged.model_name
    if model == TINY_MODEL_NAME:
        return _tiny_model_folder(), TINY_MODEL_NAME
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ExportError(f"{model!r} is not a local HF model folder (no config.json there); vLLM"
                          " exports need the model on disk")
    return path, model


TINY_CHAT_TEMPLATE = "{% for message in messages %}{{ message.content }}\n{% endfor %}"


def _tiny_model_folder() -> Path:
    """The tiny test model saved once as a folder (vLLM loads models from disk only), in the
    variant vLLM's CPU attention takes (models/tiny.py: TINY_VLLM_NUM_HEADS)."""
    from models.tiny import TINY_VLLM_NUM_HEADS, build_tiny_model_and_tokenizer

    target = export_cache_root() / "models" / f"tiny-random-{TINY_VLLM_NUM_HEADS}heads"
    if not (target / "config.json").is_file():
        model, tokenizer = build_tiny_model_and_tokenizer(seed=0, num_heads=TINY_VLLM_NUM_HEADS)
        # A plain template, so that chat requests work too (vLLM refuses templates sent with them).
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        with tempfile.TemporaryDirectory(dir=_ensure_dir(target.parent)) as work:
            staging = Path(work) / "model"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resolve_guard(guard: str | Path | GenGuard, model_name: str) -> GenGuard:
    if isinstance(guard, GenGuard):
        return guard
    if guard == "default":
        guard_dir = shipped_guard_dir(model_name)
        if guard_dir is None:
            raise ExportError(f"no GenGuard is shipped for {model_name}; build one with"
                              f" `python -m guard_training build --model ...` and pass its folder")
        return GenGuard.load(guard_dir)
    return GenGuard.load(guard)


def _guard_digest(guard: GenGuard) -> str:
    digest = hashlib.sha256()
    state = {k: v.detach().float().contiguous() for k, v in guard.state_dict().items()}
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    digest.update(json.dumps(guard.policy.to_json(), sort_keys=True).encode())
    return digest.hexdigest()


def _model_digest(folder: Path) -> str:
    """Cheap identity of a model folder: its config and its weight files' names, sizes, mtimes."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.name.endswith(WEIGHT_SUFFIXES):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def export_folder_for(model: str, guard: str | Path | GenGuard = "default") -> Path:
    """The cached export of (model, guard), built on first use. Raises ExportError /
    GuardMismatchError with what to do for a model or guard that cannot be exported."""
    from models.lock import file_lock

    source, model_name = resolve_model_folder(model)
    genguard = _resolve_guard(guard, model_name)
    key = hashlib.sha256(f"{EXPORT_FORMAT_VERSION}:{_model_digest(source)}:{_guard_digest(genguard)}"
                         .encode()).hexdigest()[:16]
    target = export_cache_root() / f"{model_slug(model_name)}-{key}"
    if (target / META_FILE).is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / META_FILE).is_file():  # another process built it while we waited
            return target
        logger.warning("exporting %s with its GenGuard for vLLM into %s (once)", model_name, target)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=_ensure_dir(target.parent)) as work:
            staging = Path(work) / "export"
            build_export(source, model_name, genguard, staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


def build_export(source: Path, model_name: str, guard: GenGuard, out_dir: Path) -> GuardExport:
    """Write the export of `source` + `guard` into `out_dir` (which must not exist)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    guard.check_tensors()  # a guard built in code meets the rule a loaded one did
    config = json.loads((source / "config.json").read_text())
    text_config = config.get("text_config", config)
    hidden_size, vocab_size = int(text_config["hidden_size"]), int(text_config["vocab_size"])
    if guard.hidden_size != hidden_size:
        raise GuardMismatchError(
            f"GenGuard was built for hidden size {guard.hidden_size} ({guard.model_name or 'unknown model'}),"
            f" but {source} has hidden size {hidden_size}; train a guard for this model with"
            " `python -m guard_training build --model ...`")
    tokenizer = AutoTokenizer.from_pretrained(source)
    num_tokenizer_ids = len(tokenizer)
    is_tied = bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))

    out_dir.mkdir(parents=True)
    weight_files = sorted(p for p in source.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not weight_files:
        raise ExportError(f"{source} has no .safetensors weights; vLLM exports need safetensors")
    weight_map = (json.loads((source / INDEX_FILE).read_text())["weight_map"]
                  if (source / INDEX_FILE).is_file() else None)
    head_names = ["model.embed_tokens.weight"] + ([] if is_tied else ["lm_head.weight"])
    files_to_edit = sorted({weight_map[name] if weight_map else weight_files[0].name
                            for name in head_names if weight_map is None or name in weight_map})

    num_spare_rows = vocab_size - num_tokenizer_ids
    new_vocab_size = vocab_size
    if num_spare_rows < NUM_GUARD_ROWS:
        needed = max(vocab_size, num_tokenizer_ids) + NUM_GUARD_ROWS
        new_vocab_size = -(-needed // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
        logger.warning("%s has %d spare head rows; extending the vocabulary %d -> %d",
                       model_name, max(num_spare_rows, 0), vocab_size, new_vocab_size)
    first_row = new_vocab_size - NUM_GUARD_ROWS
    stop_row, done_row = first_row, first_row + 1
    marker_ids = tuple(first_row + 2 + int(kind) for kind in MarkerKind)

    stop_weight = (guard.linear.weight[STOP_INDEX] - guard.linear.weight[CONTINUE_INDEX]).detach().float()
    stop_bias = float((guard.linear.bias[STOP_INDEX] - guard.linear.bias[CONTINUE_INDEX]).detach())
    has_done = guard.done_linear is not None
    done_weight = guard.done_linear.weight[0].detach().float() if has_done else None
    done_bias = float(guard.done_linear.bias[0].detach()) if has_done else 0.0

    found = set()
    for path in weight_files:
        if path.name not in files_to_edit:
            _link_or_copy(path, out_dir / path.name)
            continue
        tensors = load_file(str(path))
        for name in head_names:
            if name not in tensors:
                continue
            found.add(name)
            head = tensors[name]
            if head.shape[0] != vocab_size or head.shape[1] != hidden_size:
                raise ExportError(f"{path}: {name} has shape {tuple(head.shape)}, expected"
                                  f" ({vocab_size}, {hidden_size})")
            if new_vocab_size > vocab_size:
                head = torch.cat([head, head.new_zeros(new_vocab_size - vocab_size, hidden_size)])
            head = head.clone()
            head[first_row:] = 0
            head[stop_row] = (stop_weight * GUARD_LOGIT_SCALE).to(head.dtype)
            if has_done:
                head[done_row] = (done_weight * GUARD_LOGIT_SCALE).to(head.dtype)
            tensors[name] = head.contiguous()
        save_file(tensors, str(out_dir / path.name), metadata={"format": "pt"})
    missing = [name for name in head_names if name not in found]
    if missing:
        raise ExportError(f"{source}: cannot find the LM head tensor(s) {missing} in its safetensors;"
                          " only models whose head is `lm_head.weight` (or tied to"
                          " `model.embed_tokens.weight`) can be exported")

    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "config.json":
            shutil.copy2(path, out_dir / path.name)
    text_config["vocab_size"] = new_vocab_size
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    eos_token_ids = _eos_token_ids(source, config, tokenizer)
    generation_config = (json.loads((source / "generation_config.json").read_text())
                         if (source / "generation_config.json").is_file() else {})
    generation_config["eos_token_id"] = list(eos_token_ids) + list(marker_ids)
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    TokenTable.from_tokenizer(tokenizer, new_vocab_size).save(out_dir / TABLE_FILE)
    export = GuardExport(
        model_name=model_name, guard_sha256=_guard_digest(guard), stop_row=stop_row,
        done_row=done_row if has_done else None, marker_ids=marker_ids, logit_scale=GUARD_LOGIT_SCALE,
        stop_bias=stop_bias, done_bias=done_bias, policy=guard.policy, eos_token_ids=eos_token_ids,
        num_tokenizer_ids=num_tokenizer_ids, vocab_size=new_vocab_size)
    (out_dir / META_FILE).write_text(json.dumps(export.to_json(), indent=2) + "\n")
    return export


def _eos_token_ids(source: Path, config: dict, tokenizer) -> tuple[int, ...]:
    """The ids that end generation for this model: config, generation config, tokenizer, and the
    chat turn end (as our engine does, engine/model_loading.py; models/eos.py)."""
    from models.eos import EXTRA_EOS_TOKENS

    ids: set[int] = set()
    generation_path = source / "generation_config.json"
    sources = [config, json.loads(generation_path.read_text()) if generation_path.is_file() else {}]
    for mapping in sources:
        eos = mapping.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in EXTRA_EOS_TOKENS if token in vocab)
    return tuple(sorted(i for i in ids if i is not None))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # unchanged shards: no second copy on disk
    except OSError:
        shutil.copy2(source, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guard.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', another packaged model (qwen2.5-coder-1.5b) or a local HF model folder")
    parser.add_argument("--guard", default="default", help="'default' (shipped for the model) or a guard folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(export_folder_for(args.model, args.guard))
    except (ExportError, GuardMismatchError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
