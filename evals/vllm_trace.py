"""The guard's trace inside vLLM, read back: which records are a prompt's, and what vLLM's engine
decoded per request (the processor writes both; `guard.vllm_processor`)."""
from __future__ import annotations

import os
from pathlib import Path

from engine import SamplingParams
from evals.mbxp import load_problems, split_problems
from evals.methods import method_params


def trace_key(tokenizer, prompt: str, stop=()) -> str | None:
    """The key of a prompt's records in the processor's trace (`guard.vllm_processor.prompt_key`)."""
    from guard.vllm_processor import prompt_key

    return prompt_key(tokenizer(prompt, add_special_tokens=False)["input_ids"], stop)


# The guard mode each vLLM method's requests run in, as the processor's decode records name it.
TRACE_MODES = {"baseline": "observe", "stop_words": "off", "guard": "on", "guard+stop_words": "on"}


def add_decoded_tokens(backend, cell: dict, problems, trace_dir: Path, max_new_tokens: int) -> None:
    """Adds to a vLLM cell the tokens vLLM's engine decoded, per problem and in all, from the
    processor's decode records. They differ from the output's tokens where a stop string ended the
    request: vLLM matches stop strings in its front end, and the engine decodes on until the
    front end's abort reaches it. A guard stop is an EOS the engine's own scheduler sees in the
    step that samples it. One tiny request runs first, because vLLM hands the processor the
    batch's removals (the records) at the engine's next step."""
    from guard.vllm_processor import read_decoded

    backend.submit("#", SamplingParams(max_new_tokens=1, use_guard=False)).result(timeout=600)
    decoded = read_decoded(trace_dir)
    method = cell["method"]
    stop = method_params(method, cell["language"], max_new_tokens).stop
    for problem, row in zip(problems, cell["problems"]):
        key = (trace_key(backend.tokenizer, problem.prompt, stop), TRACE_MODES[method])
        if key not in decoded:
            raise RuntimeError(f"no decode record for {problem.task_id} ({method}) in {trace_dir}")
        row["num_decoded_tokens"] = decoded[key]
    cell["num_decoded_tokens"] = sum(row["num_decoded_tokens"] for row in cell["problems"])


def prepare_run(args, offset: int = 0) -> tuple[Path, Path, dict]:
    """The run's folder (`cells/` made), the processor's trace folder (set for the engine to
    read: call before vLLM starts) and `--limit` test problems per language from `offset`."""
    from guard.vllm_processor import TRACE_DIR_ENV

    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    trace_dir = out / "trace"
    os.environ[TRACE_DIR_ENV] = str(trace_dir.resolve())
    problems = {lang: split_problems(load_problems(lang), "test")[offset:offset + args.limit]
                for lang in args.languages}
    return out, trace_dir, problems

