"""The Ray backend: the 6-cell sweep on a local Ray with 2 workers gives the records of the local backend
(scores, predictions, bytes; times aside); an unreachable cluster address is a clear error before anything runs."""

from __future__ import annotations

import pytest

from kvpress.sweep import BackendError, run_sweep
from kvpress.sweep.backends import make_backend

from sweep_fixtures import save_tiny_model, snapshot, stable_records, write_spec


def test_unreachable_ray_address_is_a_clear_error(tmp_path):
    pytest.importorskip("ray")
    backend = make_backend("ray", ray_address="127.0.0.1:9", workers=2)
    with pytest.raises(BackendError, match=r"cannot reach the Ray cluster at '127.0.0.1:9'.*ray start --head"):
        backend.check()
    with pytest.raises(BackendError, match="expected HOST:PORT"):
        make_backend("ray", ray_address="host:notaport").check()
    with pytest.raises(BackendError, match="--workers must be an integer >= 1"):
        make_backend("ray", workers=0)
    with pytest.raises(BackendError, match="--ray-address needs --backend ray"):
        make_backend("local", ray_address="127.0.0.1:9")


def test_ray_never_imported_by_kvpress():
    import subprocess
    import sys

    code = "import sys, kvpress, kvpress.sweep, kvpress.cli; kvpress.cli.build_parser(); print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_backend_gives_the_local_records(tmp_path):
    pytest.importorskip("ray")
    model = save_tiny_model(tmp_path / "tiny")
    spec = write_spec(tmp_path / "six.toml", model)
    local = run_sweep(spec, tmp_path / "local", progress=False)
    ray_run = run_sweep(spec, tmp_path / "ray", backend="ray", workers=2, cpus_per_worker=1, progress=False)
    assert (local.done, ray_run.done, ray_run.failed) == (6, 6, 0)
    assert stable_records(tmp_path / "ray") == stable_records(tmp_path / "local")
    env = [r for r in __import__("kvpress").sweep.ResultStore.open(tmp_path / "ray").records()]
    assert {r["environment"]["backend"] for r in env} == {"ray"}
    # resuming on Ray runs nothing and touches nothing
    before = snapshot(tmp_path / "ray" / "cells")
    again = run_sweep(spec, tmp_path / "ray", backend="ray", workers=2, progress=False)
    assert (again.done, again.skipped) == (0, 6) and snapshot(tmp_path / "ray" / "cells") == before
