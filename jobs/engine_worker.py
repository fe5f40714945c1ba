"""The Ray Data callable class that hosts one generation backend per actor.

The backend comes from `build_backend(BackendSpec)` (ours or vLLM: this file never asks which)
and is used through the protocol only: `submit` from the batch-call threads, each returning a
concurrent Future. Ray Data runs `batches_per_actor` calls per actor at once, so while one
batch's last, longest sequences finish, the next batch's prompts already fill the slots that
guard stops (or EOS) free; without that overlap every batch would end with a tail of near-empty
decode steps, and a guard stop would save no time at all.

A prompt the backend refuses (`PromptError`: not text, empty, not encodable, too long) and a
request that raises in the engine become error rows with the reason; the batch goes on. Only an
engine that is dead (`check_health` raises) fails the batch: its rows are not done, and the
error stops the job, which a rerun then resumes.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from backends.protocol import EngineDeadError, PromptError
from backends.spec import BackendSpec, build_backend
from jobs.rows import (
    RowSettings,
    batch_counts,
    build_output,
    error_fields,
    plan_requests,
    result_fields,
)


def batch_key(batch: pa.Table, id_column: str) -> str:
    """Names a batch by its ids: a retried batch has the same key as its failed attempt."""
    ids = batch.column(id_column).to_pylist()
    return hashlib.sha1(repr(ids).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def report_start(ledger) -> None:
    import warnings

    import ray

    if ledger is not None:
        with warnings.catch_warnings():  # Ray's own property warns about an API it calls inside
            warnings.simplefilter("ignore", DeprecationWarning)
            is_restart = ray.get_runtime_context().was_current_actor_reconstructed
        ledger.worker_started.remote(is_restart)


def report_batch_start(ledger, batch: pa.Table, id_column: str) -> str:
    """Waits for the ledger's answer (a millisecond against a batch's seconds): a call still in
    flight when this actor is killed would be lost, and the retry that follows not counted."""
    import ray

    key = batch_key(batch, id_column)
    if ledger is not None:
        ray.get(ledger.batch_started.remote(key))
    return key


class BackendWorker:
    """map_batches(BackendWorker, compute=ActorPoolStrategy(...)): one backend per actor."""

    def __init__(self, spec: BackendSpec, settings: RowSettings, ledger=None):
        self.backend = build_backend(spec)
        self.settings = settings
        self.ledger = ledger
        report_start(ledger)

    def _submit(self, request):
        try:
            return self.backend.submit(request.prompt, request.params), None
        except PromptError as e:
            return None, str(e)
        except EngineDeadError:
            raise
        except Exception as e:  # the tokenizer or the engine raised for this prompt alone
            return None, f"engine refused the prompt: {type(e).__name__}: {e}"

    def _outcome(self, future) -> dict:
        try:
            return result_fields(future.result())
        except Exception as e:
            self.backend.check_health()  # raises EngineDeadError: the batch fails, not its rows
            return error_fields(f"engine error: {type(e).__name__}: {e}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        key = report_batch_start(self.ledger, batch, self.settings.id_column)
        requests = plan_requests(batch, self.settings)
        outcomes: list[dict | None] = [None] * len(requests)
        futures = {}
        for index, request in enumerate(requests):
            if request.error is not None:
                outcomes[index] = error_fields(request.error)
                continue
            future, error = self._submit(request)
            if future is None:
                outcomes[index] = error_fields(error)
            else:
                futures[index] = future
        for index, future in futures.items():
            outcomes[index] = self._outcome(future)
        table = build_output(batch, requests, outcomes)
        if self.ledger is not None:
            self.ledger.batch_finished.remote(key, batch_counts(table))
        return table

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            try:
                backend.shutdown()
            except Exception:
                pass
