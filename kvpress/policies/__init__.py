"""Eviction policies. Each policy is one short module implementing :class:`Policy.select`."""

from kvpress.policies.adakv import AdaKV
from kvpress.policies.base import Policy, ScorePolicy, check_int, check_ratio, keep_count, keep_topk
from kvpress.policies.decoding_budget import DecodingBudget
from kvpress.policies.duo_attention import DuoAttention
from kvpress.policies.h2o import H2O
from kvpress.policies.knorm import KeyNorm
from kvpress.policies.kvzip import KVzip
from kvpress.policies.learned import Learned
from kvpress.policies.interface import Pipeline, is_storage_spec
from kvpress.policies.pyramidkv import PyramidKV
from kvpress.policies.registry import available_policies, get_policy, policy_factory, register_policy
from kvpress.policies.snapkv import SnapKV
from kvpress.policies.streaming_llm import StreamingLLM
from kvpress.policies.tova import TOVA

__all__ = [
    "Policy",
    "ScorePolicy",
    "Pipeline",
    "SnapKV",
    "StreamingLLM",
    "H2O",
    "TOVA",
    "KeyNorm",
    "KVzip",
    "Learned",
    "AdaKV",
    "PyramidKV",
    "DecodingBudget",
    "DuoAttention",
    "available_policies",
    "get_policy",
    "policy_factory",
    "register_policy",
    "keep_topk",
    "keep_count",
    "check_ratio",
    "check_int",
    "is_storage_spec",
]
