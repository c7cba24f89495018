"""Backends run work units and hand every outcome (a cell record or an error entry) back to the driver, which
alone writes the result store. ``local``: this process, one model loaded at a time. ``ray``: Ray actors that
each hold a loaded model (Ray is imported only there)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from kvpress.sweep.cells import Cell

Handler = Callable[[dict[str, Any]], None]
BACKENDS = ("local", "ray")


class BackendError(RuntimeError):
    """A backend that cannot run (Ray missing, a cluster address that cannot be reached, bad worker settings)."""


class Backend(Protocol):
    name: str

    def check(self) -> None:
        """Fail early (before the store is touched) if the backend cannot run."""

    def run(self, units: list[list[Cell]], handle: Handler, fanout: bool) -> None:
        """Run every unit; call ``handle`` with each outcome as soon as it is known."""


def make_backend(name: str, *, device: str = "cpu", ray_address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0) -> Backend:
    if name == "local":
        if ray_address is not None:
            raise BackendError("--ray-address needs --backend ray")
        from kvpress.sweep.backends.local import LocalBackend

        return LocalBackend(device=device)
    if name == "ray":
        from kvpress.sweep.backends.ray_backend import RayBackend

        return RayBackend(address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker, device=device)
    raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
