"""Step 1 of a guard build at cluster scale: sample the training completions with a Ray Data job.

Sampling is nearly all of a guard build's time (labeling, features and training take minutes), so
this entrypoint spreads it over engine actors — one per GPU on a cluster — and writes the very
files `guard_training.sampling` would: `OUT/samples/<language>.jsonl`. `python -m guard_training build --out OUT`
then finds them and goes straight on to labeling, features and training.

    python -m jobs.guard_samples --model default --per-language 200 --temperatures 0.0 0.7 \
        --out runs/guard-qwen --num-actors 4 --num-gpus-per-actor 1
    python -m guard_training build --model default --per-language 200 --temperatures 0.0 0.7 --out runs/guard-qwen --ship
    ray job submit --working-dir . -- python -m jobs.guard_samples --out "$PWD/runs/guard-qwen" ...

Prompts are the MBXP *train* split (every record but the last 500 of each file) of each language.
One generation job for all languages and temperatures (each row carries its own temperature,
top_p and seed), ids `<task_id>@t<temperature>`. It writes checkpointed parquet output under
`OUT/sampling-job/output/`, so a rerun after a crash generates only the ids still missing; a
language whose samples file exists is left alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.dtypes import DTYPE_NAMES
from guard.syntax import LANGUAGES
from guard_training.sampling import training_problems, write_jsonl_atomic
from jobs.generate import JobConfig, run_job
from jobs.output import read_output


def job_dir(out: Path) -> Path:
    return out / "sampling-job"


def sample_with_ray(out: Path, languages: list[str], per_language: int, temperatures: list[float],
                    job_settings: dict, address: str | None = None, log=print,
                    offset: int = 0) -> dict[str, Path]:
    """Runs the sampling job (if not done), then writes one samples file per language not done yet.

    One job for every temperature: each row carries its own `temperature`, `top_p` and `seed`
    (per-row settings), so the actors load the model once instead of once per temperature."""
    samples_dir = out / "samples"
    todo = [lang for lang in languages if not (samples_dir / f"{lang}.jsonl").exists()]
    if not todo:
        log("[guard_samples] every language already has its samples file")
        return {lang: samples_dir / f"{lang}.jsonl" for lang in languages}
    problems = {lang: training_problems(lang, offset, per_language) for lang in todo}
    corpus = job_dir(out) / "prompts.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(corpus, [
        {"id": f"{p.task_id}@t{temperature:g}", "task_id": p.task_id, "prompt": p.prompt,
         "temperature": temperature, "top_p": 0.95 if temperature else 1.0,
         "seed": 1000 * t_index if temperature else None}
        for t_index, temperature in enumerate(temperatures) for lang in todo for p in problems[lang]])
    log(f"[guard_samples] {sum(map(len, problems.values()))} prompts x temperatures "
        f"{', '.join(f'{t:g}' for t in temperatures)}")
    config = JobConfig.from_args({"input": str(corpus), "output": str(job_dir(out) / "output"), "guard": None,
                                  **job_settings})
    run_job(config, address=address, log=log)
    columns = ["task_id", "temperature", "completion", "completion_ids", "finish_reason", "error"]
    outputs = {(row["task_id"], row["temperature"]): row
               for row in read_output(config.output, columns).to_pylist()}
    for lang in todo:
        rows, num_errors = [], 0
        for temperature in temperatures:
            for problem in problems[lang]:
                row = outputs.get((problem.task_id, temperature))
                if row is None or row["error"] is not None:
                    num_errors += 1  # e.g. a prompt longer than the model's context
                    continue
                rows.append({"task_id": problem.task_id, "language": lang,
                             "entry_point": problem.entry_point, "temperature": temperature,
                             "prompt": problem.prompt, "completion": row["completion"],
                             "completion_ids": row["completion_ids"],
                             "finish_reason": row["finish_reason"]})
        samples_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(samples_dir / f"{lang}.jsonl", rows)
        log(f"[guard_samples] {lang}: {len(rows)} samples written, {num_errors} prompts not served")
    return {lang: samples_dir / f"{lang}.jsonl" for lang in languages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.guard_samples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the guard build folder (same as guard build --out)")
    p.add_argument("--model", default="default")
    p.add_argument("--backend", default="codefast", choices=["codefast", "vllm"],
                   help="what samples: our engine (any HF causal LM) or vLLM (faster; the model must run on it)")
    p.add_argument("--languages", default=",".join(LANGUAGES))
    p.add_argument("--per-language", type=int, default=60)
    p.add_argument("--offset", type=int, default=0, help="first train-split prompt (as guard build --offset)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.6])
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES))
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    args = p.parse_args(argv)
    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    unknown = set(languages) - set(LANGUAGES)
    if unknown or args.per_language < 1 or args.offset < 0 or any(not 0 <= t <= 1.5 for t in args.temperatures):
        p.error(f"languages must come from {LANGUAGES}, --per-language >= 1, --offset >= 0, temperatures in [0, 1.5]")
    settings = dict(backend=args.backend, model=args.model, max_new_tokens=args.max_new_tokens,
                    min_actors=args.num_actors, max_actors=args.num_actors,
                    num_gpus_per_actor=args.num_gpus_per_actor, num_cpus_per_actor=args.num_cpus_per_actor,
                    batch_size=args.batch_size, max_num_seqs=args.max_num_seqs, dtype=args.dtype)
    paths = sample_with_ray(Path(args.out), languages, args.per_language, args.temperatures, settings,
                            address=args.address, log=lambda line: print(line, flush=True), offset=args.offset)
    print(json.dumps({lang: str(path) for lang, path in paths.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
