"""Fault injection: an exception (or Ctrl-C) raised inside a policy at every phase restores the model bit for bit;
a write that fails while a sweep stores a cell (a full disk) loses and corrupts nothing, and the rerun completes
exactly the missing cells; SIGKILL of a Ray sweep mid-run, then resume (the local backend's SIGKILL test is in
tests/test_sweep_run.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import kvpress
from kvpress.cli import main as kvpress_main
from kvpress.policies import H2O, Policy, SnapKV
from kvpress.quant import KVQuant
from kvpress.sweep import ResultStore, load_spec, plan, run_sweep
from kvpress.sweep import store as store_module
from sweep_fixtures import snapshot, stable_records, write_spec
from tiny_models import left_padded_batch, tiny_model

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ exceptions inside a policy
class _Fails(Policy):
    """Raises ``exc`` in ``select`` at the first layer call of ``phase``; otherwise delegates to ``inner``."""

    name = "fails_test"

    def __init__(self, phase: str, exc: BaseException, inner: Policy | None = None, layer: int = 1):
        self.phase, self.exc, self.inner, self.layer = phase, exc, inner, layer
        self.reposition = False

    def select(self, ctx):
        if ctx.phase == self.phase and ctx.layer_idx == self.layer:
            raise self.exc
        return self.inner.select(ctx) if self.inner is not None else None


def _fingerprint(model) -> tuple:
    """Everything patching could leave behind: weights and buffers (bytes), config, hooks, attention registry."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    registry = sorted(k for k in AttentionInterface._global_mapping if k.startswith("kvpress"))
    masks = sorted(k for k in AttentionMaskInterface._global_mapping if k.startswith("kvpress"))
    return digest.hexdigest(), model.config.to_dict(), model.config._attn_implementation, hooks, registry, masks


def _drive(model, ids, mask, phase: str, how: str) -> None:
    """Run forwards that reach ``phase``: prefill, then an extend (several tokens), then decode steps."""
    if how == "generate":
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return
    cache = None
    with torch.no_grad():
        session = kvpress.patching._MODEL_SESSIONS[model]
        cache = session.new_cache()
        out = model(input_ids=ids, attention_mask=mask, **kvpress.cache_kwargs(model, cache))
        more = ids[:, -3:]
        mask = torch.cat([mask, torch.ones_like(more)], 1)
        out = model(input_ids=more, attention_mask=mask, **kvpress.cache_kwargs(model, cache))  # extend
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, **kvpress.cache_kwargs(model, cache))  # decode


INNER = {"none": lambda: None, "snapkv": lambda: SnapKV(compression_ratio=0.5, window=2),
         "h2o": lambda: H2O(budget=6, window=2)}


@pytest.mark.parametrize("phase", ["prefill", "extend", "decode"])
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_exception_in_a_policy_restores_the_model_bit_for_bit(phase, exc, inner, attn):
    model = tiny_model("llama", attn=attn)
    ids, mask = left_padded_batch([14, 9], seed=3)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    before = _fingerprint(model)
    how = "generate" if phase != "extend" else "forwards"  # generate never extends
    with pytest.raises(type(exc)):
        with kvpress.patch(model, _Fails(phase, exc, INNER[inner]())):
            _drive(model, ids, mask, phase, how)
    assert _fingerprint(model) == before
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)
    # and kvpress patches it again as if nothing happened, with the same result as a fresh model
    fresh = tiny_model("llama", attn=attn)
    policy = SnapKV(compression_ratio=0.5, window=2)
    outputs = []
    for m in (model, fresh):
        with kvpress.patch(m, policy):
            outputs.append(m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                      pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_exception_with_quantized_storage_restores_the_model(phase):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([20, 12], seed=4)
    before = _fingerprint(model)
    with pytest.raises(RuntimeError, match="boom"):
        with kvpress.patch(model, _Fails(phase, RuntimeError("boom")) | KVQuant(bits=2, group_size=4, residual=4)):
            _drive(model, ids, mask, phase, "generate")
    assert _fingerprint(model) == before


# ------------------------------------------------------------------------------------ failing writes
@pytest.fixture(scope="module")
def uninterrupted(spec_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "store"
    summary = run_sweep(spec_path, out, progress=False)
    assert (summary.done, summary.failed) == (6, 0)
    return out


def _full_disk_after(monkeypatch, n_ok: int) -> list[str]:
    """Make the store's ``fsync`` fail with ENOSPC from the (n_ok + 1)-th cell record on (its content was
    already partly written to the temporary file); returns the list of records attempted."""
    attempts: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if "/cells/" in name:
            attempts.append(name)
            if len(attempts) > n_ok:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    return attempts


def _check_store(out: Path, *, killed: bool = False) -> set[str]:
    """Every record whole and named by its key, no temporary file left (``killed``: a SIGKILLed writer may leave
    them, but no reader takes one for a record); the stored keys."""
    cells = out / "cells"
    for path in cells.glob("*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        assert record["key"] == path.stem and record["status"] == "ok"
    if not killed:
        assert not list(cells.glob(".*.tmp")), "a failed write left its temporary file"
    return ResultStore.open(out).finished_keys()


@pytest.mark.parametrize("n_ok", [0, 2])
def test_full_disk_while_storing_a_cell_loses_nothing_and_the_rerun_completes(spec_path, uninterrupted, tmp_path,
                                                                               monkeypatch, n_ok):
    out = tmp_path / "store"
    attempts = _full_disk_after(monkeypatch, n_ok)
    with pytest.raises(OSError) as info:
        run_sweep(spec_path, out, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert len(attempts) == n_ok + 1  # the sweep stopped at the first failed write
    stored = _check_store(out)
    assert len(stored) == n_ok
    before = snapshot(out / "cells")
    monkeypatch.undo()  # space again
    summary = run_sweep(spec_path, out, progress=False)
    all_keys = {c.key for c in plan(load_spec(spec_path)).cells}
    assert set(summary.ran) == all_keys - stored and summary.skipped == n_ok and summary.done == 6 - n_ok
    assert {k: v for k, v in snapshot(out / "cells").items() if k in before} == before
    assert stable_records(out) == stable_records(uninterrupted)


def test_full_disk_through_the_cli_is_one_line(spec_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "store"
    _full_disk_after(monkeypatch, 1)
    code = kvpress_main(["sweep", "run", str(spec_path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("kvpress sweep: error: ") and "No space left on device" in err[-1]
    assert len(_check_store(out)) == 1


def test_a_failed_error_record_does_not_lose_the_stored_cells(model_dir, tmp_path, monkeypatch):
    """The disk fills while a failing cell's error entry is written: the records before it stay whole."""
    from kvpress.policies import register_policy
    from kvpress.policies.registry import _REGISTRY

    register_policy("fails_test", lambda: _Fails("prefill", RuntimeError("cell fails")))
    try:
        spec = write_spec(tmp_path / "spec.toml", model_dir, text=f"""
models = ["{model_dir}"]
tasks = ["niah_single_noise"]
policies = ["streaming_llm(window=64)", "fails_test"]
lengths = [700]
samples = 1
baseline = false
[task.niah_single_noise]
max_new_tokens = 2
""")
        real = store_module._write_new

        def write_new(path, payload):
            if path.parent.name == "errors":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, payload)

        monkeypatch.setattr(store_module, "_write_new", write_new)
        out = tmp_path / "store"
        with pytest.raises(OSError):
            run_sweep(spec, out, progress=False)
        stored = _check_store(out)
        assert len(stored) <= 1 and not list((out / "errors").iterdir())
        monkeypatch.undo()
        summary = run_sweep(spec, out, progress=False)
        assert summary.failed == 1 and summary.done + len(stored) == 1
    finally:
        _REGISTRY.pop("fails_test", None)


# ------------------------------------------------------------------------------------------ Ray backend
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_sigkill_mid_ray_sweep_then_resume_runs_exactly_the_missing_cells(spec_path, uninterrupted, tmp_path):
    """SIGKILL the driver of a Ray sweep (2 workers) once 2 cells are stored, then its whole process group (the
    local Ray it started); rerun on Ray: exactly the missing cells run, the records equal the local run's."""
    pytest.importorskip("ray")
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "kvpress.cli", "sweep", "run", str(spec_path), "--out", str(out),
                             "--no-progress", "--backend", "ray", "--workers", "2"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "cells").is_dir() and len(list((out / "cells").glob("*.json"))) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray processes this driver started (its session only)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stored = _check_store(out, killed=True)
    assert 2 <= len(stored) < 6
    before = snapshot(out / "cells")
    summary = run_sweep(spec_path, out, backend="ray", workers=2, progress=False)
    all_keys = {c.key for c in plan(load_spec(spec_path)).cells}
    assert set(summary.ran) == all_keys - stored and summary.skipped == len(stored)
    assert {k: v for k, v in snapshot(out / "cells").items() if k in before} == before
    assert stable_records(out) == stable_records(uninterrupted)
    _check_store(out)  # the rerun removed the killed driver's temporary files


def test_a_rerun_removes_the_temporary_files_of_dead_writers_only(spec_path, tmp_path):
    """A killed writer's ``.tmp`` (its pid gone) is removed when the store is opened for writing; a live writer's
    and another host's are kept, and none is ever read as a record."""
    out = tmp_path / "store"
    store = ResultStore.open(out, create=True, for_writing=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = store_module._host()
    names = {"dead": f".k1.json.{host}.{dead.pid}.{'a' * 32}.tmp", "live": f".k2.json.{host}.{os.getpid()}.{'b' * 32}.tmp",
             "other_host": f".k3.json.elsewhere.{dead.pid}.{'c' * 32}.tmp"}
    for name in names.values():
        (store.cells_dir / name).write_text("{\"key\": \"half", encoding="utf-8")
    assert store.finished_keys() == set()
    ResultStore.open(out, for_writing=True)
    left = {p.name for p in store.cells_dir.iterdir()}
    assert left == {names["live"], names["other_host"]}
    assert ResultStore.open(out).finished_keys() == set()  # reading never removes or reads them


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_full_disk_on_the_ray_backend_loses_nothing(spec_path, uninterrupted, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    out = tmp_path / "store"
    _full_disk_after(monkeypatch, 2)  # the driver writes the records, so the failure is the driver's
    with pytest.raises(OSError):
        run_sweep(spec_path, out, backend="ray", workers=2, progress=False)
    stored = _check_store(out)
    assert len(stored) == 2
    monkeypatch.undo()
    summary = run_sweep(spec_path, out, backend="ray", workers=2, progress=False)
    assert summary.skipped == 2 and summary.done == 4
    assert stable_records(out) == stable_records(uninterrupted)
