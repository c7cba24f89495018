"""The Ray backend: Ray actors that each hold a loaded model and take work units; outcomes flow back to the driver.

    kvpress sweep run SPEC --out DIR --backend ray                      # starts a local Ray (one worker per CPU)
    kvpress sweep run SPEC --out DIR --backend ray --ray-address HOST:6379 --cpus-per-worker 4 --gpus-per-worker 1

Ray is imported here only (``pip install 'kvpress[ray]'``). On a cluster every node needs kvpress (and the
models' files or packages) installed; a local Ray started here gives its workers this process's ``sys.path``.
An actor keeps the last model it loaded and prefers units of that model, so models load once per actor.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from typing import Any

from kvpress.sweep.backends import BackendError, Handler
from kvpress.sweep.cells import Cell
from kvpress.sweep.execute import ModelHolder, error_entry, run_unit

LOCAL_ADDRESSES = (None, "", "local")


class _Worker:
    """The actor's body (made remote at run time, so this module imports without Ray)."""

    def __init__(self, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.holder = ModelHolder(device)

    def run(self, unit: list[Cell], fanout: bool) -> list[dict[str, Any]]:
        return run_unit(self.holder, unit, fanout=fanout, backend="ray")


def _host_port(address: str) -> tuple[str, int]:
    text = address.split("://", 1)[1] if "://" in address else address
    default = 10001 if address.startswith("ray://") else 6379
    host, _, port = text.rpartition(":")
    if not host:
        host, port = text, str(default)
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise BackendError(f"--ray-address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or 'auto')") from None


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, device: str = "cpu", connect_timeout: float = 5.0):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise BackendError(f"--workers must be an integer >= 1, got {workers!r}")
        if not cpus_per_worker > 0:
            raise BackendError(f"--cpus-per-worker must be > 0, got {cpus_per_worker!r}")
        if gpus_per_worker < 0:
            raise BackendError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker!r}")
        self.address = address
        self.workers = workers
        self.cpus = cpus_per_worker
        self.gpus = gpus_per_worker
        self.device = "cuda" if gpus_per_worker > 0 else device
        self.connect_timeout = connect_timeout

    def check(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BackendError("--backend ray needs Ray: pip install 'kvpress[ray]'") from None
        if self.address in LOCAL_ADDRESSES or self.address == "auto":
            return
        host, port = _host_port(self.address)
        try:
            socket.create_connection((host, port), timeout=self.connect_timeout).close()
        except OSError as err:
            raise BackendError(
                f"cannot reach the Ray cluster at {self.address!r} ({host}:{port}: {err}). Start one with "
                "`ray start --head` there, fix --ray-address, or leave it out to start a local Ray"
            ) from None

    def _init(self):
        import ray

        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
        if self.address in LOCAL_ADDRESSES:
            workers = self.workers or max(1, int((os.cpu_count() or 1) // self.cpus))
            kwargs["num_cpus"] = max(1, int(round(workers * self.cpus)))
            # Workers of a Ray started here import kvpress (and anything else) from this process's sys.path.
            path = os.pathsep.join(p for p in sys.path if p)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except Exception as err:  # noqa: BLE001 - ConnectionError, version mismatches, ...: one clear message
            raise BackendError(f"could not start or join Ray (address {self.address or 'local'}): {err}") from None
        return True

    def run(self, units: list[list[Cell]], handle: Handler, fanout: bool) -> None:
        import ray

        if not units:
            return
        started_here = self._init()
        actors: list[Any] = []
        try:
            n_workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus))
            n_workers = min(n_workers, len(units))
            remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(_Worker)
            threads = max(1, int(self.cpus))
            actors = [remote.remote(self.device, threads) for _ in range(n_workers)]
            pending = deque(units)
            last_model: dict[int, str] = {}
            running: dict[Any, tuple[int, list[Cell]]] = {}

            def submit(slot: int) -> None:
                if not pending:
                    return
                want = last_model.get(slot)
                unit = next((u for u in pending if u[0].model == want), pending[0])
                pending.remove(unit)
                last_model[slot] = unit[0].model
                running[actors[slot].run.remote(unit, fanout)] = (slot, unit)

            for slot in range(n_workers):
                submit(slot)
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                slot, unit = running.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the worker died (e.g. out of memory): a fresh one
                    outcomes = [error_entry(c, err, {"backend": "ray"}) for c in unit]
                    actors[slot] = remote.remote(self.device, threads)
                    last_model.pop(slot, None)
                except ray.exceptions.RayTaskError as err:
                    outcomes = [error_entry(c, err, {"backend": "ray"}) for c in unit]
                for outcome in outcomes:
                    handle(outcome)
                submit(slot)
        finally:
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            if started_here:
                ray.shutdown()
