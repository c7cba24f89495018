import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton kernels' tests (tests/test_kernels_*.py) run on CPU tensors through Triton's interpreter, GPU or not
# (benchmarks/decode_attention.py checks the compiled kernels on a GPU). Triton reads the variable when it decorates
# its own functions, at its first import, which torch._dynamo does when kvpress (via transformers) is imported: so
# it is set here, before any test module imports kvpress.
os.environ.setdefault("TRITON_INTERPRET", "1")
# pytest runs with -n 2 (one worker per core): one intra-op thread per worker avoids oversubscription,
# which made tiny-model tests up to ~10x slower on a loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, loaded once per test process (slow tier)."""
    import kvpress

    return kvpress.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of the embedded Gemma-3-270M (18 layers, 15 sliding with a 512-token window), loaded once
    per test process (slow tier; needs the `gemma` extra)."""
    import kvpress

    return kvpress.load_model("gemma3-270m")


# A tiny model saved to disk and a six-cell sweep spec over it, shared by the sweep run and fault-injection tests
# (module-scoped: each test module saves its own copy).
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sweep_fixtures import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def spec_path(model_dir, tmp_path_factory):
    from sweep_fixtures import write_spec

    return write_spec(tmp_path_factory.mktemp("spec") / "six.toml", model_dir)
