"""The local backend: every unit in this process, in plan order (models outermost, so each loads once)."""

from __future__ import annotations

from kvpress.sweep.backends import Handler
from kvpress.sweep.cells import Cell
from kvpress.sweep.execute import ModelHolder, run_unit


class LocalBackend:
    name = "local"

    def __init__(self, device: str = "cpu"):
        self.holder = ModelHolder(device)

    def check(self) -> None:
        return None

    def run(self, units: list[list[Cell]], handle: Handler, fanout: bool) -> None:
        for unit in units:
            for outcome in run_unit(self.holder, unit, fanout=fanout, backend=self.name):
                handle(outcome)
