"""Policy expressions: the one way to configure a policy, written as in Python and parsed safely (``ast``,
nothing evaluated). Used by ``kvpress eval``, ``kvpress perplexity``, the sweep, the lm-eval adapter and the
benchmarks, and printed back by every report as a configuration's label (a label parses to the same
configuration).

    snapkv                                        a registry policy with its defaults
    snapkv(compression_ratio=0.5, window=16)      parameters (keywords, or positionals in signature order)
    snapkv(compression_ratio=0.5) | kvquant(bits=2)   a pipeline (evict, then quantize), as ``|`` in Python
    kvquant(bits=[2, 4], rotate=[True, False])    a list is a grid axis: 4 configurations
    adakv(snapkv(window=16), compression_ratio=0.5)   a policy as a parameter (wrappers)
    kvquant(bits=4, fp_dtype=torch.float16)       torch dtypes by name; a tuple is a literal sequence

Names are looked up in :mod:`kvpress.policies.registry` and parameters are checked against the registered
factory's signature (``inspect``), so a policy registered tomorrow works here unchanged. Values may be numbers,
strings, booleans, ``None``, tuples, dictionaries of literals, ``torch.<dtype>``, nested policy calls and (as grid
axes) lists of those.

A shared ratio (the sweep's ``ratios`` axis, ``kvpress eval --compression-ratio``) reaches every top-level stage
whose factory takes ``compression_ratio`` and that is not sized already (by ``compression_ratio``, ``budget``,
or its own size parameter: StreamingLLM's ``window``, DuoAttention's ``sparsity``/``threshold``); every eviction
policy of the registry takes one. A stage without a ``compression_ratio`` parameter (``kvquant``) runs once.
Policies whose native size is a token count (StreamingLLM, DecodingBudget) or a head fraction (DuoAttention) size
themselves from the ratio at their first forward; :meth:`PolicyConfig.build` with ``n_tokens`` fixes the size
from that length instead (the sweep's perplexity cells size from the window length).
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable

from kvpress.policies.interface import Pipeline
from kvpress.policies.registry import available_policies, canonical_policy_name, get_policy, policy_factory, \
    size_parameters

BASELINE = "none"


class ExpressionError(ValueError):
    """A bad policy expression; the message names the offending key (the sweep raises it as ``SpecError``)."""


@dataclass(frozen=True)
class Dtype:
    """``torch.<name>`` written in an expression (kept by name so configurations stay JSON and hashable)."""

    name: str

    def resolve(self) -> Any:
        import torch

        return getattr(torch, self.name)

    def __str__(self) -> str:
        return f"torch.{self.name}"


@dataclass(frozen=True)
class Mapping:
    """A ``{"key": value}`` literal written in an expression (e.g. ``adakv(scorer_params={'window': 16})``), kept
    as sorted items so configurations stay hashable; built as a ``dict``."""

    items: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {_value_text(v)}" for k, v in self.items) + "}"


def literal(value: Any) -> Any:
    """A Python parameter value in the form configurations hold: dicts as :class:`Mapping`, lists as tuples
    (literal sequences, not grid axes), ``torch`` dtypes as :class:`Dtype`."""
    if isinstance(value, dict):
        return Mapping(tuple(sorted((str(k), literal(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return tuple(literal(v) for v in value)
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return Dtype(str(value).split(".", 1)[1])
    return value


@dataclass(frozen=True)
class Stage:
    """One registry policy with explicit parameters (values are literals, :class:`Dtype` or nested stages)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    # How a shared ratio reaches this stage: "compression_ratio" or None (it does not).
    ratio_via: str | None = None

    def text(self, ratio: float | None = None) -> str:
        """The stage as an expression (with the shared ``ratio`` when it reaches the stage)."""
        parts = [f"{k}={_value_text(v)}" for k, v in self.params]
        if ratio is not None and self.ratio_via:
            parts.insert(0, f"compression_ratio={ratio:g}")
        return f"{self.name}({', '.join(parts)})" if parts else self.name


@dataclass(frozen=True)
class PolicyConfig:
    """One policy configuration: a pipeline of stages (none = the uncompressed baseline) and the shared ratio
    given to it (a sweep's or ``kvpress eval``'s). Its :attr:`label` is an expression that parses back to it
    (:func:`parse_config`)."""

    stages: tuple[Stage, ...] = ()
    ratio: float | None = None

    @classmethod
    def of(cls, name: str, params: dict[str, Any] | None = None, ratio: float | None = None,
           where: str = "policy") -> "PolicyConfig":
        """A one-stage configuration from a registry name, fixed parameters and a shared ratio (checked against
        the registry; the ratio reaches the stage only if it takes one, see :func:`ratio_route`)."""
        name = _policy_name(name, where) if isinstance(name, str) else name
        if name == BASELINE:
            if params:
                raise ExpressionError(f"{where}: 'none' takes no parameters")
            return cls()
        known, open_kwargs = factory_parameters(name)
        for key in params or {}:
            if key not in known and not open_kwargs:
                raise ExpressionError(f"{where}: policy {name!r} has no parameter {key!r}; its parameters: "
                                      f"{', '.join(known) or 'none'}")
        stage = Stage(name, tuple((k, literal(v)) for k, v in (params or {}).items()))
        if ratio is not None:
            _check_ratio(ratio)
            stage = Stage(stage.name, stage.params, ratio_route(stage))
            if stage.ratio_via is None:
                ratio = None
        return cls((stage,), None if ratio is None else float(ratio))

    @property
    def is_baseline(self) -> bool:
        return not self.stages

    @property
    def name(self) -> str:
        return "|".join(s.name for s in self.stages) if self.stages else BASELINE

    @property
    def label(self) -> str:
        return " | ".join(s.text(self.ratio) for s in self.stages) if self.stages else BASELINE

    @property
    def compression_ratio(self) -> float | None:
        """The ratio of this configuration: the sweep's, else an explicit ``compression_ratio`` of a stage."""
        if self.ratio is not None:
            return self.ratio
        for stage in self.stages:
            value = dict(stage.params).get("compression_ratio")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def parameters(self) -> dict[str, Any]:
        """The parameters of a one-stage configuration (the shared ratio as ``compression_ratio``), as JSON; a
        pipeline's ``{"expression": label}``."""
        if len(self.stages) > 1:
            return {"expression": self.label}
        out = {k: _value_json(v) for stage in self.stages for k, v in stage.params}
        if self.ratio is not None:
            out["compression_ratio"] = self.ratio
        return out

    def to_json(self) -> dict[str, Any]:
        return {"expression": self.label, "ratio": self.ratio,
                "stages": [_stage_json(s) for s in self.stages]}

    def build(self, n_tokens: int | None = None, overrides: dict[str, Any] | None = None) -> Any:
        """The policy object (``None`` for the baseline). ``n_tokens``: the length a ratio refers to (the first
        forward's, or a perplexity window's); stages sized by a token count or a head fraction fix their size
        from it (``size_for``), else they size themselves at their first forward.

        ``overrides``: parameters given to every stage whose factory takes them and that does not set them
        (e.g. ``every_chunk=True`` for chunked perplexity)."""
        built = [_build_stage(s, n_tokens, self.ratio, overrides or {}) for s in self.stages]
        built = [b for b in built if b is not None]
        if not built:
            return None
        return built[0] if len(built) == 1 else Pipeline(*built)


# ------------------------------------------------------------------------------------------ registry and signatures


@functools.lru_cache(maxsize=None)
def factory_parameters(name: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """``({parameter: inspect.Parameter}, open)`` of a registry policy. ``open`` is True when the factory takes
    ``**kwargs`` that could not be resolved (then unknown keywords are left to the factory to reject). A factory
    that forwards ``**kwargs`` (e.g. ``kvquant``) is resolved through the class of the object it builds."""
    factory = policy_factory(name)
    params = _named_parameters(factory)
    if params is not None:
        return params, False
    try:
        obj = factory()
    except Exception:  # needs arguments: keep the factory's own named parameters, accept the rest
        return _named_parameters(factory, strict=False) or {}, True
    if obj is None:
        return {}, False
    resolved = _named_parameters(type(obj))
    return (resolved, False) if resolved is not None else (_named_parameters(type(obj), strict=False) or {}, True)


def _named_parameters(fn: Any, strict: bool = True) -> dict[str, inspect.Parameter] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    out = {}
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            if strict:
                return None
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL or p.name == "self":
            continue
        out[p.name] = p
    return out


def accepts(name: str, parameter: str) -> bool:
    params, _ = factory_parameters(name)
    return parameter in params


def ratio_route(stage: Stage) -> str | None:
    """How a shared ratio reaches ``stage`` (see :class:`Stage`): ``"compression_ratio"`` when its factory takes
    one and no size parameter of the policy is given; None otherwise."""
    given = dict(stage.params)
    if stage.name == BASELINE or any(k in given for k in size_parameters(stage.name)):
        return None
    return "compression_ratio" if accepts(stage.name, "compression_ratio") else None


def _check_ratio(r: Any, where: str = "compression_ratio") -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 <= r < 1:
        raise ExpressionError(f"{where}: compression_ratio must be a number in [0, 1) (the fraction of tokens "
                              f"removed), got {r!r}")


def _build_value(value: Any, n_tokens: int | None, overrides: dict[str, Any]) -> Any:
    if isinstance(value, Stage):
        return _build_stage(value, n_tokens, None, overrides)
    if isinstance(value, Dtype):
        return value.resolve()
    if isinstance(value, Mapping):
        return {k: _build_value(v, n_tokens, overrides) for k, v in value.items}
    if isinstance(value, tuple):
        return tuple(_build_value(v, n_tokens, overrides) for v in value)
    return value


def _build_stage(stage: Stage, n_tokens: int | None, ratio: float | None, overrides: dict[str, Any]) -> Any:
    params = {k: _build_value(v, n_tokens, overrides) for k, v in stage.params}
    if ratio is not None and stage.ratio_via == "compression_ratio":
        params["compression_ratio"] = ratio
    for key, value in overrides.items():
        if key not in params and accepts(stage.name, key):
            params[key] = value
    policy = get_policy(stage.name, **params)
    if n_tokens is not None and hasattr(policy, "size_for"):
        policy.size_for(n_tokens)
    return policy


# ------------------------------------------------------------------------------------------ text and JSON forms


def _value_text(value: Any) -> str:
    if isinstance(value, Stage):
        return value.text()
    if isinstance(value, (Dtype, Mapping)):
        return str(value)
    if isinstance(value, tuple):
        inner = ", ".join(_value_text(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, float):
        return repr(value)
    return repr(value)


def _value_json(value: Any) -> Any:
    if isinstance(value, Stage):
        return _stage_json(value)
    if isinstance(value, Dtype):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _value_json(v) for k, v in value.items}
    if isinstance(value, tuple):
        return [_value_json(v) for v in value]
    return value


def _stage_json(stage: Stage) -> dict[str, Any]:
    return {"policy": stage.name, "params": {k: _value_json(v) for k, v in stage.params},
            "ratio_via": stage.ratio_via}


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class _Axis:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class _Call:
    name: str
    params: tuple[tuple[str, Any], ...]


def _parse_value(node: ast.AST, where: str) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _parse_value(node.operand, where)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.List):
        if not node.elts:
            raise ExpressionError(f"{where}: empty list (a list is a grid axis and needs at least one value)")
        return _Axis(tuple(_parse_value(e, where) for e in node.elts))
    if isinstance(node, ast.Tuple):
        return tuple(_parse_value(e, where) for e in node.elts)
    if isinstance(node, ast.Dict):
        if not all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            raise ExpressionError(f"{where}: dictionary keys must be strings, got {ast.unparse(node)!r}")
        items = {k.value: _parse_value(v, where) for k, v in zip(node.keys, node.values)}
        if any(isinstance(v, (_Axis, _Call)) for v in items.values()):
            raise ExpressionError(f"{where}: a dictionary holds literals only (no lists as grid axes, no policy calls)")
        return Mapping(tuple(sorted(items.items())))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
        import torch

        if not isinstance(getattr(torch, node.attr, None), torch.dtype):
            raise ExpressionError(f"{where}: torch.{node.attr} is not a torch dtype")
        return Dtype(node.attr)
    if isinstance(node, (ast.Call, ast.Name)):
        return _parse_call(node, where)
    raise ExpressionError(f"{where}: unsupported value {ast.unparse(node)!r} (numbers, strings, True/False/None, "
                          "tuples, dictionaries, torch.<dtype>, policy calls, and lists as grid axes)")


def _parse_call(node: ast.AST, where: str) -> _Call:
    if isinstance(node, ast.Name):
        return _Call(_policy_name(node.id, where), ())
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ExpressionError(f"{where}: expected a policy name or call, got {ast.unparse(node)!r}")
    name = _policy_name(node.func.id, where)
    params, open_kwargs = factory_parameters(name)
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out: dict[str, Any] = {}
    if len(node.args) > len(positional):
        raise ExpressionError(f"{where}: {name}() takes at most {len(positional)} positional arguments "
                        f"({', '.join(p.name for p in positional) or 'none'}), got {len(node.args)}")
    for param, arg in zip(positional, node.args):
        out[param.name] = _parse_value(arg, f"{where}: {name}({param.name}=...)")
    for kw in node.keywords:
        if kw.arg is None:
            raise ExpressionError(f"{where}: **-unpacking is not supported in policy expressions")
        if kw.arg in out:
            raise ExpressionError(f"{where}: {name}() got parameter {kw.arg!r} twice")
        # sliding_layers: the registry's option of every eviction policy (get_policy applies it), not a constructor's
        if kw.arg not in params and not open_kwargs and kw.arg != "sliding_layers":
            allowed = ", ".join(params) or "none"
            raise ExpressionError(f"{where}: policy {name!r} has no parameter {kw.arg!r}; its parameters: {allowed}")
        out[kw.arg] = _parse_value(kw.value, f"{where}: {name}({kw.arg}=...)")
    return _Call(name, tuple(out.items()))


def _policy_name(raw: str, where: str) -> str:
    try:
        return canonical_policy_name(raw)
    except ValueError:
        raise ExpressionError(f"{where}: unknown policy {raw!r}; available policies: "
                        f"{', '.join(available_policies())}") from None


def _parse_stages(node: ast.AST, where: str) -> list[_Call]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _parse_stages(node.left, where) + _parse_stages(node.right, where)
    return [_parse_call(node, where)]


def parse(text: str, where: str = "policy") -> list[_Call]:
    """Parse one expression into its stages (grid axes unexpanded); raises :class:`ExpressionError`."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"{where}: a policy expression must be a non-empty string, got {text!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"{where}: cannot parse {text!r}: {err.msg}") from None
    return _parse_stages(tree.body, where)


# ------------------------------------------------------------------------------------------ grid expansion


def _expand_value(value: Any) -> list[Any]:
    if isinstance(value, _Axis):
        return [v for item in value.values for v in _expand_value(item)]
    if isinstance(value, _Call):
        return list(_expand_call(value))
    if isinstance(value, tuple):
        return [tuple(combo) for combo in itertools.product(*(_expand_value(v) for v in value))]
    return [value]


def _expand_call(call: _Call) -> Iterable[Stage]:
    keys = [k for k, _ in call.params]
    for combo in itertools.product(*(_expand_value(v) for _, v in call.params)):
        yield Stage(call.name, tuple(zip(keys, combo)))


def expand(text: str, ratios: Iterable[float] | None = None, where: str = "policy") -> list[PolicyConfig]:
    """Every configuration an expression denotes: its own grid axes x the sweep's ``ratios`` (for the stages a
    ratio reaches; a configuration no stage of which takes a ratio runs once)."""
    calls = parse(text, where)
    ratios = list(ratios or [])
    for i, r in enumerate(ratios):
        _check_ratio(r, f"ratios[{i}]")
    out: list[PolicyConfig] = []
    for stages in itertools.product(*(list(_expand_call(c)) for c in calls)):
        stages = tuple(s for s in stages if s.name != BASELINE) if len(stages) > 1 else stages
        if len(stages) == 1 and stages[0].name == BASELINE:
            if stages[0].params:
                raise ExpressionError(f"{where}: 'none' takes no parameters")
            out.append(PolicyConfig())
            continue
        routed = tuple(Stage(s.name, s.params, ratio_route(s) if ratios else None) for s in stages)
        if ratios and any(s.ratio_via for s in routed):
            out.extend(PolicyConfig(routed, float(r)) for r in ratios)
        else:
            out.append(PolicyConfig(routed))
    return out


def parse_config(text: str, where: str = "policy") -> PolicyConfig:
    """The one configuration ``text`` denotes (a report's label, a CLI's ``--policy``); grid axes are refused."""
    configs = expand(text, None, where)
    if len(configs) != 1:
        raise ExpressionError(f"{where}: {text!r} denotes {len(configs)} configurations (lists are grid axes); "
                              "give one")
    return configs[0]


def check_builds(config: PolicyConfig, n_tokens: int | None, where: str) -> None:
    """Build ``config`` once (cheap: no model) so the factory validates every value; raises :class:`ExpressionError`."""
    try:
        config.build(n_tokens)
    except Exception as err:  # noqa: BLE001 - any factory error (bad value, missing file, ...) is a spec error
        raise ExpressionError(f"{where}: {config.label}: {type(err).__name__ + ': ' if not isinstance(err, ValueError) else ''}"
                        f"{err}") from None
