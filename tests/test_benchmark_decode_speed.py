"""The decode-speed benchmark (the GPU command) runs end to end at toy sizes: a tiny random Llama, the Triton
decode kernels through ``TRITON_INTERPRET=1``, every configuration of the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernels_reference import triton_missing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))
def test_decode_speed_smoke_runs_every_configuration_through_the_triton_interpreter(tmp_path):
    out = tmp_path / "decode_speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KVPRESS_KERNELS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["backend"] == "triton" and result["meta"]["model"] == "tiny-random"
    rows = result["rows"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from decode_speed import CONFIGS
    finally:
        sys.path.pop(0)
    assert [r["config"] for r in rows if r["prompt_tokens"] == 300] == [c.format(half=150) for c in CONFIGS]
    by_config = {r["config"]: r for r in rows if r["prompt_tokens"] == 300}
    assert by_config["none"]["bytes_ratio"] == 1.0 and by_config["none"]["decode_ratio"] == 1.0
    # at 300 tokens every configuration holds less than the full cache (2-bit codes past the 128-token residual)
    for config, row in by_config.items():
        if config != "none":
            assert row["bytes_ratio"] < 0.8, (config, row["bytes_ratio"])
        assert len(row["steps_s"]) == result["meta"]["steps"] and row["decode_tok_s"] > 0
    assert "| 300 | `kvquant(bits=2)` |" in proc.stdout
