"""DuoAttention head identification (not a policy: the policy is :class:`kvpress.policies.DuoAttention`).

* :mod:`kvpress.duo.pattern`: the ``[layers, kv_heads]`` gate file (safetensors + metadata) and its checks;
* :mod:`kvpress.duo.identify`: gates optimised on synthetic passkey prompts with the model frozen (the paper's way);
* :mod:`kvpress.duo.cheap`: a training-free ranking by attention on a planted needle.
"""

from kvpress.duo.pattern import DuoPattern, embedded_pattern, load_pattern

__all__ = ["DuoPattern", "embedded_pattern", "load_pattern"]
