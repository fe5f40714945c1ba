"""Bounded load on the CodeFast Serve endpoint with MBXP prompts, guard off vs on in one run.

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --num-clients 8 --num-requests 64
    python -m benchmarks.serve_load --start --model codefast/tiny-random --guard none --dtype float32 \
        --num-clients 2 --num-requests 4 --max-tokens 16          # smoke run, starts its own server

N client threads send a fixed number of non-streaming completions per guard mode (the per-request
`guard` field, so both modes hit the same replicas), stop early at --max-seconds, and a markdown
table reports throughput, latency percentiles, errors and what the guard stopped. Prompts:
MBXP (Athiwaratkun et al., CC BY 4.0), from the repository's data/mbxp/ (evals.mbxp).
"""
from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import dataclass

import httpx

from benchmarks.report import write_report
from deployments.finish_reasons import is_guard_stop
from evals.mbxp import load_problems


def mbxp_prompts(language: str) -> list[str]:
    return [problem.prompt for problem in load_problems(language)]


def interleaved_prompts(languages: list[str], count: int) -> list[str]:
    """Round robin over languages, so every prefix of the list mixes them."""
    per_language = [mbxp_prompts(lang) for lang in languages]
    prompts = [p[i] for i in range(max(map(len, per_language))) for p in per_language if i < len(p)]
    return prompts[:count]


@dataclass(frozen=True)
class Outcome:
    latency_s: float
    is_ok: bool
    finish_reason: str = ""
    completion_tokens: int = 0
    guard_dropped_tokens: int = 0
    error: str = ""


def send(http: httpx.Client, body: dict) -> Outcome:
    start = time.perf_counter()
    try:
        response = http.post("/v1/completions", json=body)
    except httpx.HTTPError as exc:
        return Outcome(time.perf_counter() - start, False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return Outcome(latency, False, error=f"HTTP {response.status_code}: {response.text[:200]}")
    payload = response.json()
    usage = payload["usage"]
    choice = payload["choices"][0]
    return Outcome(latency, True, "guard" if is_guard_stop(choice) else choice["finish_reason"] or "",
                   usage["completion_tokens"], usage.get("guard_dropped_tokens", 0))


def guard_field(mode: str) -> str | float:
    """"on" / "off" / a threshold such as "0.3" (the request's `guard` field is then a number)."""
    return mode if mode in ("on", "off") else float(mode)


def run_mode(url: str, model: str, prompts: list[str], guard: str, args) -> tuple[list[Outcome], float]:
    """All prompts through `num_clients` threads; no new request starts after max_seconds."""
    todo: queue.Queue = queue.Queue()
    for prompt in prompts:
        todo.put(prompt)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=args.request_timeout) as http:
            while time.monotonic() < deadline:
                try:
                    prompt = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = send(http, {"model": model, "prompt": prompt, "max_tokens": args.max_tokens,
                                      "temperature": 0, "guard": guard_field(guard)})
                with lock:
                    outcomes.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.max_seconds + args.request_timeout)
    return outcomes, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few requests it is an observed latency)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def table_row(guard: str, outcomes: list[Outcome], wall_s: float) -> str:
    ok = [o for o in outcomes if o.is_ok]
    latencies = [o.latency_s for o in ok]
    num_tokens = sum(o.completion_tokens for o in ok)
    num_guard = sum(o.finish_reason == "guard" for o in ok)
    mean_tokens = num_tokens / len(ok) if ok else 0.0
    return (f"| {guard} | {len(outcomes)} | {len(outcomes) - len(ok)} | {wall_s:.1f} | {len(ok) / wall_s:.2f}"
            f" | {num_tokens / wall_s:.1f} | {percentile(latencies, 50):.2f} | {percentile(latencies, 95):.2f}"
            f" | {mean_tokens:.1f} | {num_guard} | {sum(o.guard_dropped_tokens for o in ok)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=32, help="requests per guard mode")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--languages", default="python,javascript,go,cpp")
    parser.add_argument("--modes", default="off,on", help="guard field values, in order (on, off, 0.3, ...)")
    parser.add_argument("--max-seconds", type=float, default=600, help="per mode: no new request after")
    parser.add_argument("--request-timeout", type=float, default=300)
    server = parser.add_argument_group("--start: run a local server for the duration of the load")
    server.add_argument("--start", action="store_true")
    server.add_argument("--model", default="default")
    server.add_argument("--guard", default="default")
    server.add_argument("--max-num-seqs", type=int, default=8)
    server.add_argument("--dtype", default="auto")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--num-cpus", type=float, default=1.0,
                        help="replica CPUs; Ray sets the replica's torch threads from it")
    args = parser.parse_args(argv)
    if args.num_clients < 1 or args.num_requests < 1:
        parser.error("--num-clients and --num-requests must be >= 1")

    prompts = interleaved_prompts(args.languages.split(","), args.num_requests)
    url = args.url
    if args.start:
        from deployments.config import ServeConfig
        from deployments.serve_cli import start_local_ray, start_server, stop_server

        config = ServeConfig.from_args(dict(model=args.model, guard=args.guard, max_num_seqs=args.max_num_seqs,
                                            dtype=args.dtype, num_cpus=args.num_cpus))
        start_local_ray(num_cpus=4)  # more logical CPUs than cores: proxy + replica never starve
        url = start_server(config, "127.0.0.1", args.port)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=args.request_timeout).json()["data"][0]["id"]
        with httpx.Client(base_url=url, timeout=args.request_timeout) as http:
            warmup = send(http, {"model": model, "prompt": prompts[0], "max_tokens": 4, "temperature": 0})
        if not warmup.is_ok:
            raise SystemExit(f"warm-up request failed: {warmup.error}")
        print(f"model={model} clients={args.num_clients} requests/mode={len(prompts)}"
              f" max_tokens={args.max_tokens} languages={args.languages}\n", flush=True)
        rows, errors = [], []
        for guard in args.modes.split(","):
            outcomes, wall_s = run_mode(url, model, prompts, guard, args)
            rows.append(table_row(guard, outcomes, wall_s))
            errors += [f"guard={guard}: {o.error}" for o in outcomes if not o.is_ok]
        report = "\n".join(["| guard | requests | errors | wall s | req/s | completion tok/s | p50 latency s"
                            " | p95 latency s | mean completion tokens | guard stops | guard-dropped tokens |",
                            "|---|---|---|---|---|---|---|---|---|---|---|", *rows])
        print(report)
        write_report("serve_load", f"model={model} clients={args.num_clients} requests/mode={len(prompts)}"
                     f" max_tokens={args.max_tokens} languages={args.languages}\n\n" + report)
        for error in errors[:5]:
            print(f"\nerror: {error}")
        print(flush=True)
    finally:
        if args.start:
            stop_server()


if __name__ == "__main__":
    main()
