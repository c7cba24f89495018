"""Eviction policies. Each policy is one short module implementing :class:`Policy.select`."""

from kvpress.policies.base import Policy, ScorePolicy, check_int, check_ratio, keep_topk
from kvpress.policies.pipeline import Pipeline, is_storage_spec
from kvpress.policies.registry import available_policies, get_policy, register_policy
from kvpress.policies.snapkv import SnapKV
from kvpress.policies.streaming_llm import StreamingLLM

__all__ = [
    "Policy",
    "ScorePolicy",
    "Pipeline",
    "SnapKV",
    "StreamingLLM",
    "available_policies",
    "get_policy",
    "register_policy",
    "keep_topk",
    "check_ratio",
    "check_int",
    "is_storage_spec",
]
