"""Start a local Ray, deploy the CodeFast app on 127.0.0.1 and block until Ctrl-C.

    python -m deployments.serve_cli --model default --port 8000
    python -m deployments.serve_cli --model codefast/tiny-random --guard none --dtype float32

Same application as `serve run deployments/config.yaml`; this entry point exists so one command
gives a server without a running cluster or a YAML file.
"""
from __future__ import annotations

import argparse
import time

from backends.spec import BackendSpec, add_spec_arguments, spec_from_namespace
from deployments.config import ServeConfig

APP_NAME = "codefast"


def start_local_ray(num_cpus: int | None = None) -> None:
    import ray

    from scripts.ray_local import RAY_LOCAL_ENV, apply_local_env

    apply_local_env()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": RAY_LOCAL_ENV}, ignore_reinit_error=True)


def start_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                 app_name: str = APP_NAME) -> str:
    """Deploy on an already running Ray; returns once the app is RUNNING. Returns the base URL."""
    from ray import serve

    from deployments.app import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=app_name, route_prefix="/")
    return f"http://{host}:{port}"


def stop_server() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_arguments(parser, BackendSpec())  # --backend, --model, --guard, --max-num-seqs...
    parser.add_argument("--max-ongoing-requests", type=int, default=None,
                        help="requests Serve lets into one replica (>= max-num-seqs; default 2x)")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (1 on a GPU node)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(engine=spec_from_namespace(args, BackendSpec()),
                       max_ongoing_requests=args.max_ongoing_requests, min_replicas=args.min_replicas,
                       max_replicas=args.max_replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = config_from_args(args)  # fails here, before Ray starts, on a bad flag
    start_local_ray()
    try:
        url = start_server(config, args.host, args.port)
        print(f"CodeFast serving {config.engine.model} at {url}/v1/completions (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        stop_server()


if __name__ == "__main__":
    main()
