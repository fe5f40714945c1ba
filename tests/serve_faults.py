"""Test-only: the CodeFast Serve app with a switch that makes its engine's steps raise or hang.

`FaultInjectingServer` is the app's own deployment class (same endpoints, same `check_health`)
plus, inside the replica, a wrapper around the model runner's prefill and decode that reads a
control file before every step: "raise" makes the step raise, "flaky" every other step, "hang"
blocks it until the file says otherwise (at most MAX_HANG_S), anything else runs it. Why a file:
the switch has to reach a replica process that the test cannot call into, and be flipped while
that replica is stuck in a step, without a request field, config option or environment variable
that production code would have to know about. Both processes run on this machine, so a path in
the test's tmp dir does.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

from ray import serve

from deployments.app import CodeFastServer
from deployments.config import ServeConfig

RAISE, FLAKY, HANG = "raise", "flaky", "hang"
MAX_HANG_S = 120.0  # a hung step gives up eventually, whatever the test does
POLL_S = 0.05


class InjectedFault(RuntimeError):
    """What a step raises while the control file says "raise" (or "flaky", every other time)."""


def _faulty(step, control_file: Path, flaky_steps: itertools.count):
    """`flaky_steps` is shared by prefill and decode: "every other step" counts both."""
    def run(seqs):
        deadline = time.monotonic() + MAX_HANG_S
        while (fault := _read(control_file)) == HANG and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if fault == RAISE or (fault == FLAKY and next(flaky_steps) % 2 == 0):
            raise InjectedFault("fault injected by the test")
        return step(seqs)
    return run


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class FaultInjectingServer(CodeFastServer.func_or_class):
    async def __init__(self, config: ServeConfig, control_file: str, wedge_timeout_s: float):
        await super().__init__(config)
        runner, flaky_steps = self.backend.engine.runner, itertools.count()
        runner.prefill = _faulty(runner.prefill, Path(control_file), flaky_steps)
        runner.decode = _faulty(runner.decode, Path(control_file), flaky_steps)
        self.backend.aengine.health.wedge_timeout_s = wedge_timeout_s


def build_fault_app(config: ServeConfig, control_file: Path, wedge_timeout_s: float,
                    health_check_period_s: float):
    """One replica, checked often, replaced fast (no CPUs reserved: it must not wait for the
    module's main deployment to give some back)."""
    deployment = serve.deployment(name="CodeFastFaults")(FaultInjectingServer)
    return deployment.options(
        num_replicas=1, max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0}, health_check_period_s=health_check_period_s,
        health_check_timeout_s=10, graceful_shutdown_timeout_s=1, graceful_shutdown_wait_loop_s=0.5,
    ).bind(config, str(control_file), wedge_timeout_s)
