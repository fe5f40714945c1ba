"""GenGuard: a Linear(hidden, 2) probe over the LLM's last hidden state (after the final norm).

Class index 1 = continue, 0 = stop. A guard is stored as two files in one folder:
`guard.safetensors` (the linear layer) and `guard.json` (which model it belongs to, hidden size,
stop policy, training report). One guard per LLM, shared across programming languages.
Both are checked whole at load: a wrong type, a misspelt policy field, a missing section or a
NaN in the weights is one GuardFileError line naming the file and the field, never a silent
default (a NaN bias would turn the guard off).

Optional done head (format 2): a Linear(hidden, 1) on the same hidden state, the probability
that the token being produced is the last one of the expected code (`p_done`). The stop head
only learns that the code is excess once the first excess token is being produced, one decode
step after the stop-word heuristic has seen `\n}`; a sure `p_done` on a line end stops right
there, keeping that line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from guard.policy import PolicyError, StopPolicy

WEIGHTS_FILE = "guard.safetensors"
META_FILE = "guard.json"
FORMAT_VERSION = 2
SUPPORTED_FORMATS = (1, 2)  # 1: no done head
STOP_INDEX, CONTINUE_INDEX = 0, 1
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


class GuardMismatchError(ValueError):
    """The guard was trained on a model with another hidden size than the one it is attached to."""


class GuardFileError(ValueError):
    """A guard file is unreadable or incomplete; the message names the file and the field."""


GUARD_FIX = "save the guard again (GenGuard.save) or copy the folder from where it was built"


class GenGuard(torch.nn.Module):
    def __init__(self, hidden_size: int, model_name: str = "", policy: StopPolicy | None = None,
                 metadata: dict | None = None, has_done_head: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.model_name = model_name
        self.policy = policy or StopPolicy()
        self.metadata = dict(metadata or {})
        self.linear = torch.nn.Linear(hidden_size, 2)
        self.done_linear = torch.nn.Linear(hidden_size, 1) if has_done_head else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [..., 2] logits."""
        return self.linear(hidden_states.to(self.linear.weight.dtype))

    @torch.inference_mode()
    def stop_probs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, H] last hidden states -> [B] probability that each token is excess (stop)."""
        return torch.softmax(self.forward(hidden_states).float(), dim=-1)[..., STOP_INDEX]

    @torch.inference_mode()
    def done_probs(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """[B, H] -> [B] p_done ("the token being produced ends the expected code"), or None for
        a guard without a done head."""
        if self.done_linear is None:
            return None
        logits = self.done_linear(hidden_states.to(self.done_linear.weight.dtype))[..., 0]
        return torch.sigmoid(logits.float())

    def check_compatible(self, hidden_size: int, model_name: str = "") -> None:
        if hidden_size != self.hidden_size:
            raise GuardMismatchError(
                f"GenGuard was built for a model with hidden size {self.hidden_size}"
                f" ({self.model_name or 'unknown model'}), but the model"
                f" {model_name or ''} has hidden size {hidden_size}; train a guard for this model"
                " with `python -m guard_training build --model ...`")

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in self.linear.state_dict().items()}
        if self.done_linear is not None:
            state.update({f"done_{k}": v.detach().float().contiguous()
                          for k, v in self.done_linear.state_dict().items()})
        save_file(state, str(out_dir / WEIGHTS_FILE))
        meta = {"format_version": FORMAT_VERSION, "model": self.model_name,
                "hidden_size": self.hidden_size, "policy": self.policy.to_json(), **self.metadata}
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir

    @classmethod
    def load(cls, guard_dir: str | Path) -> "GenGuard":
        guard_dir = Path(guard_dir)
        meta_path, weights_path = guard_dir / META_FILE, guard_dir / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"no GenGuard at {guard_dir}: expected {META_FILE} and {WEIGHTS_FILE}")
        meta = _read_meta(meta_path)
        hidden_size, policy = _check_meta(meta, meta_path)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise GuardFileError(f"{weights_path} is not a readable safetensors file"
                                 f" ({type(exc).__name__}: {exc}); {GUARD_FIX}") from exc
        has_done_head = "done_weight" in state
        check_weights(state, hidden_size, has_done_head, str(weights_path), f"{meta_path} says hidden size")
        extra = {k: v for k, v in meta.items() if k not in REQUIRED_FIELDS}
        guard = cls(hidden_size, meta["model"], policy, extra, has_done_head=has_done_head)
        guard.linear.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        if has_done_head:
            guard.done_linear.load_state_dict({"weight": state["done_weight"], "bias": state["done_bias"]})
        return guard.eval()

    def check_tensors(self) -> None:
        """Raise GuardFileError if this guard's tensors could not be saved and loaded back (NaN,
        inf): what an export of a guard built in code must pass too."""
        state = {k.replace("done_linear.", "done_").removeprefix("linear."): v.detach()
                 for k, v in self.state_dict().items()}
        check_weights(state, self.hidden_size, self.done_linear is not None,
                      f"the GenGuard of {self.model_name or 'an unknown model'}", "its hidden size is")


# guard.json: these four fields are required; any other top-level field is free metadata
# (the training report), kept as is.
REQUIRED_FIELDS = ("format_version", "model", "hidden_size", "policy")


def _check_meta(meta: dict, meta_path: Path) -> tuple[int, StopPolicy]:
    """(hidden size, stop policy) of a guard.json, or one GuardFileError line naming the field."""
    def fail(field: str, problem: str) -> GuardFileError:
        return GuardFileError(f"{meta_path}: field {field!r} {problem}; {GUARD_FIX}")

    missing = [name for name in REQUIRED_FIELDS if name not in meta]
    if missing:
        raise fail(missing[0], "is missing (every guard.json holds format_version, model, hidden_size and policy)")
    version = meta["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_FORMATS:
        raise fail("format_version", f"names unsupported guard format {version!r} (this version reads"
                                     f" formats {SUPPORTED_FORMATS})")
    if not isinstance(meta["model"], str):
        raise fail("model", f"must be a string (the model's name), got {meta['model']!r}")
    hidden_size = meta["hidden_size"]
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise fail("hidden_size", f"must be a positive integer, got {hidden_size!r}")
    try:
        policy = StopPolicy.from_json(meta["policy"])
    except PolicyError as exc:
        raise fail(exc.json_field, exc.problem) from exc
    return hidden_size, policy


def check_weights(state: dict, hidden_size: int, has_done_head: bool, where: str, size_source: str) -> None:
    """The guard's tensors have the shapes `hidden_size` gives and only finite values: a NaN bias
    makes every p_stop NaN, which never votes stop, so the guard would be silently off."""
    expected = {"weight": (2, hidden_size), "bias": (2,)}
    if has_done_head:
        expected.update(done_weight=(1, hidden_size), done_bias=(1,))
    for name, shape in expected.items():
        if name not in state:
            raise GuardFileError(f"{where} has no tensor {name!r} (expected shape {shape};"
                                 f" it holds {sorted(state)}); {GUARD_FIX}")
        if tuple(state[name].shape) != shape:
            raise GuardMismatchError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, but"
                                     f" {size_source} {hidden_size}, so it must be {shape}")
        if not torch.isfinite(state[name]).all():
            raise GuardFileError(f"{where}: tensor {name!r} holds NaN or infinite values; {GUARD_FIX}")


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GuardFileError(f"{meta_path} is not readable JSON ({type(exc).__name__}: {exc});"
                             f" {GUARD_FIX}") from exc
    if not isinstance(meta, dict):
        raise GuardFileError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}; {GUARD_FIX}")
    return meta


def model_slug(model_name: str) -> str:
    """A folder name for a model: its last path part, lower case, dots as underscores."""
    return model_name.rstrip("/").split("/")[-1].lower().replace(".", "_")


def shipped_guard_dir(model_name: str) -> Path | None:
    """The guard shipped in this repo for `model_name`, if any."""
    for meta_path in sorted(SHIPPED_DIR.glob(f"*/{META_FILE}")):
        if _read_meta(meta_path).get("model") == model_name:
            return meta_path.parent
    return None
