"""Engine vs HF `generate` (static batches) vs transformers `generate_batch` (continuous batching).

Side by side in one run, guard off, same prompts, same max_new_tokens, greedy:
- equal work: every request runs exactly max_new_tokens (EOS ignored where the API allows it:
  ours and HF generate; generate_batch gets the same prompts with min_new_tokens=max_new_tokens);
- varied lengths: half code prompts (long outputs), half chat prompts answered in a few words
  (EOS early), so requests finish at very different points.
Then the guard's overhead: the engine with a guard that never fires vs no guard, same work.

    python -m benchmarks.engine_speed --model default --num-prompts 16 --max-new-tokens 128
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from benchmarks.report import write_report
from engine import Engine, EngineConfig, SamplingParams
from engine.model_loading import load_model
from evals.mbxp import load_problems
from guard.policy import StopPolicy
from guard.probe import GenGuard

SHORT_QUESTIONS = ["What is 2 + 3?", "Name a primary color.", "Is Python typed dynamically?",
                   "What does HTTP stand for?", "Say hello.", "What is the capital of France?",
                   "Which is larger, 7 or 9?", "Spell 'cat' backwards."]


def code_prompts(n: int) -> list[str]:
    languages = ["python", "javascript", "go", "cpp"]
    per_language = [load_problems(lang)[-n:] for lang in languages]
    return [per_language[i % 4][i // 4].prompt for i in range(n)]


def chat_prompts(tokenizer, n: int) -> list[str]:
    questions = [SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)] + " Answer in one word." for i in range(n)]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q in questions]
    return questions


def interleave(first: list[str], second: list[str]) -> list[str]:
    mixed = [p for pair in zip(first, second) for p in pair]
    return mixed + first[len(second):] + second[len(first):]


def run_engine(engine: Engine, prompts, max_new_tokens, ignore_eos):
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, use_guard=True)
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    return sum(r.num_generated_tokens for r in results), time.perf_counter() - start


def run_hf_generate(loaded, prompts, max_new_tokens, batch_size, ignore_eos):
    tokenizer, model = loaded.tokenizer, loaded.model
    num_tokens, start = 0, time.perf_counter()
    eos = list(loaded.eos_token_ids)
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens if ignore_eos else 0,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        generated = out[:, batch["input_ids"].shape[1]:]
        for row in generated.tolist():
            # Count up to and including the first EOS, like the engine does.
            ends = [j for j, t in enumerate(row) if t in eos]
            num_tokens += ends[0] + 1 if ends and not ignore_eos else len(row)
    return num_tokens, time.perf_counter() - start


def run_generate_batch(loaded, prompts, max_new_tokens, batch_size, ignore_eos):
    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              min_new_tokens=max_new_tokens if ignore_eos else 0,
                              eos_token_id=list(loaded.eos_token_ids),
                              pad_token_id=tokenizer.pad_token_id, max_batch_tokens=512,
                              num_blocks=256, block_size=32)
    start = time.perf_counter()
    # no_grad, not inference_mode: generate_batch steps in a worker thread, which may not update
    # tensors created in inference mode on this one.
    with torch.no_grad():
        outputs = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    num_tokens = sum(len(o.generated_tokens) for o in outputs.values())
    if num_tokens == 0:
        raise RuntimeError("generate_batch returned no tokens (its requests failed; see the log above)")
    return num_tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-generate-batch", action="store_true")
    parser.add_argument("--overhead-repeats", type=int, default=3, help="alternating runs per engine")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=args.dtype)
    config = EngineConfig(max_num_seqs=args.batch_size, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, None, config, loaded.eos_token_ids,
                    loaded.model_name, loaded.max_model_len)
    n = args.num_prompts
    scenarios = {
        "equal work": (code_prompts(n), True),
        # Interleaved, as requests arrive: every static batch mixes long and short requests.
        "varied lengths": (interleave(code_prompts(n // 2), chat_prompts(loaded.tokenizer, n - n // 2)), False),
    }
    run_engine(engine, code_prompts(2), 4, True)  # warm-up (allocator, first-call overheads)
    rows = []
    for name, (prompts, ignore_eos) in scenarios.items():
        measured = {"ours (continuous batching)": run_engine(engine, prompts, args.max_new_tokens, ignore_eos),
                    "HF generate (static batches)": run_hf_generate(loaded, prompts, args.max_new_tokens,
                                                                     args.batch_size, ignore_eos)}
        if not args.skip_generate_batch:
            try:
                measured["HF generate_batch"] = run_generate_batch(
                    loaded, prompts, args.max_new_tokens, args.batch_size, ignore_eos)
            except Exception as exc:  # report, do not hide, an API that fails on this machine
                print(f"generate_batch failed in '{name}': {type(exc).__name__}: {exc}")
        base_time = measured["HF generate (static batches)"][1]
        for method, (num_tokens, wall) in measured.items():
            rows.append((name, method, num_tokens, wall, num_tokens / wall, base_time / wall))

    guard = GenGuard(loaded.model.config.get_text_config().hidden_size, loaded.model_name,
                     StopPolicy(stop_threshold=0.99, max_blank_lines=0))
    with torch.no_grad():  # never fires: all the guard's work, none of its savings
        guard.linear.weight.zero_()
        guard.linear.bias.copy_(torch.tensor([-10.0, 10.0]))
    guarded = Engine(loaded.model, loaded.tokenizer, guard, config, loaded.eos_token_ids,
                     loaded.model_name, loaded.max_model_len)
    prompts = code_prompts(n)
    # Alternate the two engines and keep each one's best run: on a shared machine the noise of a
    # single pair of runs is as large as the overhead measured.
    off_runs, on_runs = [], []
    for _ in range(args.overhead_repeats):
        off_runs.append(run_engine(engine, prompts, args.max_new_tokens, True))
        on_runs.append(run_engine(guarded, prompts, args.max_new_tokens, True))
    off_tokens, off_wall = min(off_runs, key=lambda r: r[1])
    on_tokens, on_wall = min(on_runs, key=lambda r: r[1])
    steps = guarded.stats.num_decode_steps / args.overhead_repeats
    hidden = torch.randn(args.batch_size, guard.hidden_size, dtype=loaded.model.dtype)
    start = time.perf_counter()
    for _ in range(200):
        guard.stop_probs(hidden)
    probe_ms = (time.perf_counter() - start) / 200 * 1e3

    lines = [f"model={loaded.model_name} prompts={n} max_new_tokens={args.max_new_tokens}"
             f" batch={args.batch_size} dtype={args.dtype} threads={torch.get_num_threads()}", "",
             "| scenario | method | generated tokens | wall s | tokens/s | speed vs HF generate |",
             "|---|---|---|---|---|---|"]
    for name, method, num_tokens, wall, tps, ratio in rows:
        lines.append(f"| {name} | {method} | {num_tokens} | {wall:.1f} | {tps:.1f} | {ratio:.2f}x |")
    overhead = (on_wall / on_tokens) / (off_wall / off_tokens) - 1
    lines.append(f"\nguard overhead (never-firing guard vs none, {on_tokens} tokens each):"
                 f" {overhead * 100:+.1f}% wall time per token (best of {args.overhead_repeats} alternating runs);"
                 f" probe alone {probe_ms:.3f} ms vs {on_wall / max(steps, 1) * 1e3:.1f} ms per decode step")
    print("\n" + "\n".join(lines))
    write_report("engine_speed", "\n".join(lines))

if __name__ == "__main__":
    main()
