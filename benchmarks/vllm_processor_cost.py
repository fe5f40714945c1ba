"""What GenGuard's vLLM logits processor costs per step, against the per-row Python it replaces
and against a vLLM decode step at the same batch, measured side by side in one run.

    python -m benchmarks.vllm_processor_cost --batch-sizes 64 256 --steps 300
    python -m benchmarks.vllm_processor_cost --batch-sizes 64 256 --with-decode-step   # + vLLM's own step

The processor runs outside vLLM on synthetic logits ([B, vocab] float32, as vLLM hands them
over) over the real export of the default model; every row's output grows by one token per step,
replaying the tokens of real greedy completions (reports/policy_sweep test caches), so lines,
indentation and line ends come at their real rates. Guard columns are set so that no request
stops (the steady state: a stop costs one row write, and happens once per request). Timed:
`update_state` + `apply` per step. Reference 1: the same folds as one Python call per row
(`guard.policy.fold_token`, the way our own engine folds). Reference 2 (`--with-decode-step`): a
vLLM CPU decode step of the same model at the same batch (two runs of B prompts, 8 and 24
decoded tokens each, ignore_eos; the difference over 16 steps).

Second table: the processor's GPU code path (on a CPU vLLM uses the NumPy path above) run here
on CPU tensors, for the shipped policy (syntax gate on: the votes on the host, the guard columns
copied over each step) and without the gate (the votes as torch tensors on the device, no wait),
with its torch calls per step counted (views left out; on a GPU each is a kernel launch, and
the few host arrays handed over are copies besides) and its passes over the whole [B, vocab]
logits (on a GPU, device memory traffic: 155 MB a pass at 256 rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.report import write_report

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / "reports" / "policy_sweep"


def completion_streams() -> list[list[int]]:
    streams = []
    for path in sorted(CACHE.glob("test.0.100.*.json")):
        streams += [row["ids"] for row in json.loads(path.read_text()) if row["ids"]]
    return streams


# Torch calls that make no kernel of their own (views, and the wrapping of host arrays), left out
# of the GPU code path's count of kernel launches.
_VIEW_OPS = frozenset({"aten::select", "aten::slice", "aten::alias", "aten::detach", "aten::unsqueeze",
                       "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::view",
                       "aten::as_strided", "aten::expand", "aten::empty"})
# Calls over a [B, vocab] matrix that touch a few of its columns, not all of it.
_COLUMN_OPS = frozenset({"aten::index", "aten::index_put_", "aten::gather", "aten::scatter_"})


def make_processor(folder: Path, num_slots: int, device_path: bool = False):
    from guard.vllm_processor import GenGuardLogitsProcessor

    config = SimpleNamespace(model_config=SimpleNamespace(model=str(folder)),
                             scheduler_config=SimpleNamespace(max_num_seqs=num_slots))
    cls = (type("DevicePath", (GenGuardLogitsProcessor,), {"use_device_path": True}) if device_path
           else GenGuardLogitsProcessor)
    return cls(config, torch.device("cpu"), False)


def time_processor(folder: Path, export, batch_size: int, num_steps: int, streams, is_cold: bool,
                   device_path: bool = False) -> dict:
    """Median ms per step of update_state + apply. Warm: the processor's own work (logits tensors
    reused, as caches stay warm on a GPU host, whose logits live on the device). Cold: a fresh
    [B, vocab] logits tensor every step (155 MB at 256 rows), as vLLM's CPU backend hands them
    over right after the LM head has streamed through every cache. `device_path`: the processor's
    GPU code run here on CPU tensors; its last steps are also counted with
    torch's profiler: kernel launches per step (on a GPU, host time each) and passes over the
    whole [B, vocab] logits (on a GPU, device memory traffic of 155 MB each at 256 rows)."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    processor = make_processor(folder, batch_size, device_path)
    params = SamplingParams(temperature=0.0, extra_args={"guard": "on"}, stop_token_ids=list(export.marker_ids))
    outputs = [[] for _ in range(batch_size)]
    processor.update_state(BatchUpdate(batch_size=batch_size, removed=[], moved=[],
                                       added=[(i, params, [1, 2, 3], outputs[i]) for i in range(batch_size)]))
    rng = np.random.default_rng(0)
    vocab = export.vocab_size
    base = torch.from_numpy(rng.standard_normal((batch_size, vocab), dtype=np.float32))
    # Guard columns: p_stop ~ 0.002 and p_done ~ 0: every vote says continue, nobody stops.
    base[:, export.stop_row] = -6.0 * export.logit_scale
    if export.done_row is not None:
        base[:, export.done_row] = -12.0 * export.logit_scale
    processor.apply(base.clone())  # the prefill step: probabilities of each first token
    pool = [base.clone() for _ in range(2)]
    timings = []

    def step(index: int) -> None:
        for i, out in enumerate(outputs):
            stream = streams[(i * 7) % len(streams)]
            out.append(stream[index % len(stream)])
        logits = base.clone() if is_cold else pool[index % 2]
        start = time.perf_counter()
        processor.update_state(None)
        processor.apply(logits)
        timings.append(time.perf_counter() - start)

    for index in range(num_steps):
        step(index)
    result = {"median_ms": 1e3 * statistics.median(timings[10:]),
              "p90_ms": 1e3 * float(np.quantile(timings[10:], 0.9))}
    if device_path:
        from torch.profiler import ProfilerActivity, profile

        num_counted = 10
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for index in range(num_steps, num_steps + num_counted):
                step(index)
        calls = [e for e in prof.events() if e.name.startswith("aten::") and e.name not in _VIEW_OPS
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
        passes = [e for e in calls if e.name not in _COLUMN_OPS
                  and any(list(shape) == [batch_size, vocab] for shape in e.input_shapes or ())]
        result |= {"launches": len(calls) / num_counted, "vocab_passes": len(passes) / num_counted}
    if processor.num_lost_requests or not processor.is_guarded[:batch_size].all():
        raise RuntimeError("the benchmark lost requests: it no longer measures the guarded path")
    return result


def time_per_row_python(table, policy, batch_size: int, num_steps: int, streams) -> float:
    """The same work done the way the prototype did it: one fold per row, in a Python loop."""
    from guard.policy import VoteState, fold_token

    states = [VoteState() for _ in range(batch_size)]
    timings = []
    for step in range(num_steps):
        token_ids = [streams[(i * 7) % len(streams)][step % len(streams[(i * 7) % len(streams)])]
                     for i in range(batch_size)]
        start = time.perf_counter()
        for i, token_id in enumerate(token_ids):
            states[i] = fold_token(states[i], 0.002, table.features(token_id), policy, p_done=0.0).state
        timings.append(time.perf_counter() - start)
    return 1e3 * statistics.median(timings[10:])


def time_decode_step(folder: Path, batch_size: int) -> float:
    """ms per vLLM decode step at `batch_size` (CPU, eager, the guard on)."""
    from vllm import LLM, SamplingParams

    from guard.vllm_processor import GenGuardLogitsProcessor

    llm = LLM(model=str(folder), max_num_seqs=batch_size, enforce_eager=True, max_model_len=1024,
              kv_cache_memory_bytes=2 << 30,
              logits_processors=[GenGuardLogitsProcessor], seed=0)
    prompts = [{"prompt_token_ids": [100 + (i % 50), 200 + i % 97, 300]} for i in range(batch_size)]
    walls = {}
    for num_tokens in (8, 24):
        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True,
                                extra_args={"guard": "observe"})
        llm.generate(prompts, params, use_tqdm=False)  # warm-up of this shape
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        walls[num_tokens] = time.perf_counter() - start
    del llm
    return 1e3 * (walls[24] - walls[8]) / 16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--with-decode-step", action="store_true")
    args = parser.parse_args(argv)

    from evals.methods import ungated_shipped_guard
    from guard.export import GuardExport, export_folder_for
    from guard.token_table import TABLE_FILE, TokenTable

    torch.set_num_threads(1)
    folder = export_folder_for("default", "default")
    export = GuardExport.load(folder)
    table = TokenTable.load(folder / TABLE_FILE)
    # The shipped guard with its syntax gate off, exported beside it: the gate's own cost per
    # step, side by side (the steady state proposes no stop, so the gate never parses here).
    ungated_folder = export_folder_for("default", ungated_shipped_guard(export.model_name))
    ungated_export = GuardExport.load(ungated_folder)
    streams = completion_streams()
    rows = []
    for batch_size in args.batch_sizes:
        # Gate on and off alternate, twice each, the faster run of each kept: the first run after
        # a switch pays warm-up, which would otherwise fall on whichever goes first.
        runs = {"on": [], "off": []}
        for gate in ("on", "off", "on", "off"):
            runs[gate].append(time_processor(folder if gate == "on" else ungated_folder,
                                             export if gate == "on" else ungated_export,
                                             batch_size, args.steps, streams, is_cold=False))
        warm, ungated = (min(runs[gate], key=lambda r: r["median_ms"]) for gate in ("on", "off"))
        cold = time_processor(folder, export, batch_size, args.steps, streams, is_cold=True)
        per_row = time_per_row_python(table, export.policy, batch_size, args.steps, streams)
        device = {gate: time_processor(folder if gate == "on" else ungated_folder,
                                       export if gate == "on" else ungated_export,
                                       batch_size, min(args.steps, 100), streams, is_cold=False, device_path=True)
                  for gate in ("on", "off")}
        decode = time_decode_step(folder, batch_size) if args.with_decode_step else None
        rows.append((batch_size, warm, ungated, cold, per_row, device, decode))
    lines = [f"shipped policy: syntax_gate={export.policy.syntax_gate}", "",
             "| running sequences | processor ms/step, warm (p90) | warm, gate off (p90) | cold (p90) |"
             " per-row Python folds ms/step | warm vs per-row | vLLM decode step ms | cold share of a step |",
             "|---|---|---|---|---|---|---|---|"]
    for batch_size, warm, ungated, cold, per_row, device, decode in rows:
        share = "" if decode is None else f"{100 * cold['median_ms'] / decode:.2f}%"
        lines.append(f"| {batch_size} | {warm['median_ms']:.3f} ({warm['p90_ms']:.3f}) | {ungated['median_ms']:.3f}"
                     f" ({ungated['p90_ms']:.3f}) | {cold['median_ms']:.3f}"
                     f" ({cold['p90_ms']:.3f}) | {per_row:.3f} | {per_row / warm['median_ms']:.1f}x faster |"
                     f" {'' if decode is None else f'{decode:.1f}'} | {share} |")
    lines += ["", "The GPU code path, run here on CPU tensors, warm (gate on: votes on the host, one copy of the"
              " guard columns a step; gate off: votes on the device, no wait):", "",
              "| running sequences | syntax gate | ms/step on this CPU | torch calls per step (kernels on a GPU) |"
              " passes over the [B, vocab] logits per step |",
              "|---|---|---|---|---|"]
    for batch_size, _, _, _, _, device, _ in rows:
        for gate, run in device.items():
            lines.append(f"| {batch_size} | {gate} | {run['median_ms']:.2f} | {run['launches']:.0f} |"
                         f" {run['vocab_passes']:.0f} |")
    print("\n".join(lines))
    write_report("vllm_processor_cost", "\n".join(lines))

if __name__ == "__main__":
    main()
