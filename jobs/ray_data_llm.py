"""GenGuard in Ray Data LLM: a `ray.data.llm` processor whose vLLM engines run the guard.

    from backends.ray_data_llm import build_guarded_processor
    processor = build_guarded_processor(model="default", max_tokens=300, concurrency=2)
    out = processor(ray.data.read_json("prompts.jsonl"))       # rows with a "prompt" column

For teams whose batch pipelines already use Ray Data LLM (`vLLMEngineProcessorConfig` +
`build_processor`): the engines serve the GenGuard export (guard/export.py) with the logits
processor in `engine_kwargs`, and the postprocess turns a guard stop (a marker token at the end
of `generated_tokens`) into what `jobs.generate` writes: `completion` without the excess line,
`finish_reason` "guard", `is_guard_stop`; other rows get "eos", "length" or "stop", as in those
jobs. Per row, the columns jobs.generate reads override the processor's settings: `guard` ("on" /
"off" / a threshold), `language` (the code's language for the guard's syntax gate, guard/syntax.py;
without it the language is told from the prompt), and `max_tokens`, `temperature`, `top_p`,
`seed`, `stop` (vLLM's sampling parameters). A row vLLM refuses becomes an error row (its
message in Ray Data LLM's `__inference_error__` column) instead of failing the dataset.
`jobs.generate --backend vllm` is the other way (our actors over the backend protocol, with
resume, error rows and per-row settings).
"""
from __future__ import annotations

from functools import cache

from guard.vllm_contract import GUARD_ARG, LANGUAGE_ARG
from jobs.rows import ROW_SETTING_TYPES, language_name

# The per-row settings of jobs.generate that are vLLM sampling parameters of the same name; the
# other two (guard, language) go to the guard through extra_args. vLLM checks the values, so a bad
# one makes its row an error row.
ROW_SAMPLING_COLUMNS = tuple(name for name in ROW_SETTING_TYPES if name not in ("guard", "language"))


def guarded_processor_config(model: str = "default", guard: str = "default", *, max_num_seqs: int = 16,
                             batch_size: int = 16, concurrency: int = 1, num_cpus: float = 1.0,
                             kv_cache_gib: int = 4, dtype: str = "auto", device: str = "cpu",
                             max_model_len: int = 8192, continue_on_error: bool = True):
    from ray.data.llm import vLLMEngineProcessorConfig

    from backends.spec import BackendSpec
    from backends.vllm_args import RAY_WORKER_ENV, served_folder, vllm_engine_args

    spec = BackendSpec(backend="vllm", model=model, guard=guard, max_num_seqs=max_num_seqs, dtype=dtype,
                       device=device, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len)
    folder, _ = served_folder(spec)
    args = vllm_engine_args(spec)
    is_cpu = device == "cpu"
    return vLLMEngineProcessorConfig(
        model_source=str(folder),
        engine_kwargs=args.kwargs,
        runtime_env={"env_vars": RAY_WORKER_ENV | args.env},
        # Without CPU bundles the engine stage asks for a GPU (docs/vllm-and-ray-llm-on-cpu.md).
        placement_group_config={"bundles": [{"CPU": num_cpus}]} if is_cpu else None,
        batch_size=batch_size, concurrency=concurrency,
        # A row vLLM refuses (a prompt past the context, a bad `guard` value) becomes an error row
        # (Ray Data LLM's `__inference_error__` column; it skips the postprocess), as in our jobs,
        # instead of failing the whole dataset (Ray's default).
        should_continue_on_error=continue_on_error,
        chat_template_stage=False,  # code completion: the prompt is the code to continue
        # The engine's own output has the text (vLLM detokenizes as it goes) and guard_postprocess
        # decodes a guard stop's kept ids itself, so Ray Data LLM's detokenize stage would only
        # decode everything again, in one more actor. Its tokenize stage moves tokenizing off the
        # engine's actor, worth it beside a GPU; on a CPU node that actor (a process importing
        # transformers) takes the CPU the engine runs on, and vLLM tokenizes the prompt itself.
        tokenize_stage=not is_cpu,
        detokenize_stage=False,
    )


@cache
def _outputs(folder: str):
    from backends.vllm_output import VllmOutputs

    return VllmOutputs.load(folder)


def guard_preprocess(row: dict, marker_ids: list[int], max_tokens: int, temperature: float) -> dict:
    """A row -> its vLLM request (runs in Ray Data workers): the guard's markers as stop ids, the
    row's own settings over the defaults, `guard` and `language` for the processor."""
    extra_args = {GUARD_ARG: row.get("guard") or "on"}
    language = language_name(row["language"]) if isinstance(row.get("language"), str) else None
    if language:  # else the gate guesses from the prompt
        extra_args[LANGUAGE_ARG] = language
    settings = {"temperature": temperature, "max_tokens": max_tokens}
    settings |= {name: _plain(row[name]) for name in ROW_SAMPLING_COLUMNS if row.get(name) is not None}
    return {**row, "sampling_params": {**settings, "stop_token_ids": marker_ids, "extra_args": extra_args}}


def guard_postprocess(folder: str, row: dict, max_tokens: int | None = None,
                      max_model_len: int | None = None) -> dict:
    """A processed row -> the guard's view of it (runs in Ray Data workers), as
    backends/vllm_output.py reads any vLLM output. `max_tokens` (a row's own column wins) and
    `max_model_len`: the limits the request ran under."""
    outputs = _outputs(folder)
    token_ids = [int(t) for t in row.get("generated_tokens") or []]
    vllm_reason, stop_reason = _vllm_finish(row, token_ids, outputs.export, max_tokens, max_model_len)
    kept = outputs.finished(token_ids, row.get("generated_text", ""), vllm_reason, stop_reason)
    out = {key: value for key, value in row.items() if key not in ("generated_tokens", "generated_text")}
    out.update(completion=kept.text, completion_ids=kept.token_ids, finish_reason=kept.finish_reason,
               is_guard_stop=kept.is_guard_stop, num_generated_tokens=len(token_ids))
    return out


# What vLLM names as the stop_reason of a stop string; a row does not say which string it was.
_SOME_STOP_STRING = ""


def _vllm_finish(row: dict, token_ids: list[int], export, max_tokens: int | None,
                 max_model_len: int | None) -> tuple[str, int | str | None]:
    """Ray Data LLM's rows carry no finish reason: vLLM's (finish_reason, stop_reason), told from
    the last id and the counts. vLLM ends a request on a stop token (here the guard's markers and
    the model's EOS ids), at its length (max_tokens or the model's context) or on a stop string (a
    row's `stop`)."""
    last = token_ids[-1] if token_ids else None
    if last in export.marker_ids:  # a stop token vLLM names
        return "stop", last
    if last in export.eos_token_ids:
        return "stop", None
    limit = row.get("max_tokens") or max_tokens
    num_tokens = (row.get("num_input_tokens") or 0) + len(token_ids)
    is_at_context = max_model_len is not None and num_tokens >= max_model_len
    # Short of both limits, only a stop string can have ended it; without any, a limit did.
    if (limit is not None and len(token_ids) >= limit) or is_at_context or _is_empty(row.get("stop")):
        return "length", None
    return "stop", _SOME_STOP_STRING


def _is_empty(value) -> bool:
    return value is None or len(value) == 0


def _plain(value):
    """A row's value as vLLM takes it: Ray Data hands NumPy scalars and arrays for Arrow columns."""
    return value.tolist() if hasattr(value, "tolist") else value


def build_guarded_processor(model: str = "default", guard: str = "default", *, max_tokens: int = 300,
                            temperature: float = 0.0, **config_kwargs):
    """A Ray Data LLM processor: rows with `prompt` (and optionally per-row settings) in, the
    guard's columns out (see module docstring). `max_tokens` and `temperature` are the defaults
    a row's own columns override."""
    from ray.data.llm import build_processor

    from guard.export import GuardExport

    config = guarded_processor_config(model, guard, **config_kwargs)
    folder = config.model_source
    markers = list(GuardExport.load(folder).marker_ids)
    max_model_len = config.engine_kwargs["max_model_len"]

    def preprocess(row: dict) -> dict:
        return guard_preprocess(row, markers, max_tokens, temperature)

    def postprocess(row: dict) -> dict:
        return guard_postprocess(folder, row, max_tokens, max_model_len)

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)
