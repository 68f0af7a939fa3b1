"""The per-head plan: schema (version 1), YAML load/save, validation, budgets and presets.

Every error is a PlanError whose message starts with the YAML path of the bad
field (e.g. ``prefill.layers.7.3.vertical``) and says what was expected.
"""
from __future__ import annotations

import copy
import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PLAN_VERSION = 1
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("dense", "a_shape", "vertical_slash", "block")


class PlanError(ValueError):
    """A plan that cannot be used, with the YAML path of the offending field."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


# --------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """A token count, fixed or growing with the sequence length: clamp(ceil(frac*n), min, max)."""

    fixed: int | None = None
    frac: float | None = None
    min: int | None = None
    max: int | None = None

    def resolve(self, n: int) -> int:
        if self.fixed is not None:
            return self.fixed
        value = math.ceil(self.frac * n)
        if self.min is not None:
            value = max(value, self.min)
        if self.max is not None:
            value = min(value, self.max)
        return max(value, 1)

    def to_yaml(self):
        if self.fixed is not None:
            return self.fixed
        out = {"frac": self.frac}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_budget(value, path: str) -> Budget:
    if _is_int(value):
        if value <= 0:
            raise PlanError(path, f"budget must be a positive token count, got {value}")
        return Budget(fixed=value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"frac", "min", "max"}
        if unknown:
            raise PlanError(f"{path}.{sorted(unknown)[0]}", "unknown key; a budget takes frac, min, max")
        if "frac" not in value:
            raise PlanError(f"{path}.frac", "missing; a budget mapping needs frac in (0, 1]")
        frac = value["frac"]
        if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac <= 1:
            raise PlanError(f"{path}.frac", f"must be a number in (0, 1], got {frac!r}")
        bounds = {}
        for key in ("min", "max"):
            if key in value:
                if not _is_int(value[key]) or value[key] <= 0:
                    raise PlanError(f"{path}.{key}", f"must be a positive integer, got {value[key]!r}")
                bounds[key] = value[key]
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise PlanError(f"{path}.min", f"min ({bounds['min']}) exceeds max ({bounds['max']})")
        return Budget(frac=float(frac), **bounds)
    raise PlanError(path, f"budget must be a positive integer or {{frac, min, max}}, got {value!r}")


# --------------------------------------------------------------------------- field kinds
def _pos_int(value, path):
    if not _is_int(value) or value <= 0:
        raise PlanError(path, f"must be a positive integer, got {value!r}")
    return value


def _nonneg_int(value, path):
    if not _is_int(value) or value < 0:
        raise PlanError(path, f"must be a non-negative integer, got {value!r}")
    return value


def _fraction(value, path):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise PlanError(path, f"must be a number in (0, 1], got {value!r}")
    return float(value)


def _reuse(value, path):
    if value is None or value is False:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not -1 <= value <= 1:
        raise PlanError(path, f"must be a cosine-similarity threshold in [-1, 1] or null, got {value!r}")
    return float(value)


def _channels(value, path):
    if _is_int(value):
        return _pos_int(value, path)
    if isinstance(value, list) and value and all(_is_int(c) and c >= 0 for c in value):
        if len(set(value)) != len(value):
            raise PlanError(path, "channel indices must be distinct")
        return list(value)
    raise PlanError(path, f"must be a channel count or a non-empty list of channel indices, got {value!r}")


def _estimator(value, path):
    if value not in ("pooled", "antidiagonal"):
        raise PlanError(path, f"must be 'pooled' or 'antidiagonal', got {value!r}")
    return value


# name -> (parser, default); a default of REQUIRED means the key must be given
REQUIRED = object()
PREFILL_PATTERNS: dict[str, dict[str, tuple]] = {
    "dense": {},
    "a_shape": {"sink": (_pos_int, 128), "local": (_pos_int, 1024),
                "dense_tail": (_nonneg_int, 0)},  # last rows of the call see every key
    "vertical_slash": {
        "vertical": (parse_budget, REQUIRED),
        "slash": (parse_budget, REQUIRED),
        "last_q": (_pos_int, 64),
        "sink": (_nonneg_int, 64),    # first columns always kept
        "local": (_nonneg_int, 64),   # nearest diagonals always kept
        "dense_tail": (_nonneg_int, 0),    # last rows of the call see every key
    },
    "block": {
        "top_k": (parse_budget, None),     # number of kv blocks per query block
        "coverage": (_fraction, None),     # or: smallest set reaching this estimated mass
        "estimator": (_estimator, "pooled"),
        "stride": (_pos_int, 8),           # antidiagonal stride
        "dense_tail": (_nonneg_int, 0),    # last rows of the call see every key
    },
}
DECODE_METHODS: dict[str, dict[str, tuple]] = {
    "dense": {},
    "streaming": {"sink": (_pos_int, 128), "local": (_pos_int, 1024)},
    "token_select": {
        "budget": (parse_budget, REQUIRED),
        "sink": (_nonneg_int, 16),
        "local": (_nonneg_int, 64),
        "reuse": (_reuse, None),
    },
    "double_sparsity": {
        "channels": (_channels, 16),
        "budget": (parse_budget, REQUIRED),
        "sink": (_nonneg_int, 16),
        "local": (_nonneg_int, 64),
    },
    "quest": {
        "page": (_pos_int, 16),
        "budget": (parse_budget, REQUIRED),
        "sink": (_nonneg_int, 16),
        "local": (_nonneg_int, 64),
    },
}


@dataclass(frozen=True)
class Rule:
    """One head's choice: a pattern/method name and its resolved parameters."""

    kind: str
    params: dict = field(default_factory=dict, hash=False, compare=True)
    explicit: tuple = ()   # keys given in the YAML (save writes only these, so round trips are exact)

    def __getattr__(self, item):
        try:
            return self.__dict__["params"][item]
        except KeyError as exc:
            raise AttributeError(item) from exc

    def key(self) -> tuple:
        """Hashable identity, so heads with the same rule are computed together."""
        return (self.kind, tuple(sorted((k, repr(v)) for k, v in self.params.items())))

    def to_yaml(self, name_key: str) -> dict:
        out = {name_key: self.kind}
        for k in self.explicit:
            v = self.params[k]
            out[k] = v.to_yaml() if isinstance(v, Budget) else copy.deepcopy(v)
        return out


def parse_rule(raw, path: str, section: str) -> Rule:
    name_key, table = ("pattern", PREFILL_PATTERNS) if section == "prefill" else ("method", DECODE_METHODS)
    if not isinstance(raw, Mapping):
        raise PlanError(path, f"must be a mapping with a '{name_key}' key, got {raw!r}")
    if name_key not in raw:
        raise PlanError(f"{path}.{name_key}", f"missing; one of {', '.join(table)}")
    kind = raw[name_key]
    if kind not in table:
        raise PlanError(f"{path}.{name_key}", f"unknown {name_key} {kind!r}; expected one of {', '.join(table)}")
    spec = table[kind]
    params, explicit = {}, []
    for key, value in raw.items():
        if key == name_key:
            continue
        if key not in spec:
            allowed = ", ".join(spec) or "no parameters"
            raise PlanError(f"{path}.{key}", f"unknown key for {name_key} {kind!r}; allowed: {allowed}")
        parser, _ = spec[key]
        params[key] = parser(value, f"{path}.{key}")
        explicit.append(key)
    for key, (_, default) in spec.items():
        if key not in params:
            if default is REQUIRED:
                raise PlanError(f"{path}.{key}", f"missing; {name_key} {kind!r} requires it")
            params[key] = default
    if kind == "block":
        if (params["top_k"] is None) == (params["coverage"] is None):
            raise PlanError(path, "pattern 'block' needs exactly one of top_k or coverage")
    return Rule(kind, params, tuple(explicit))


# --------------------------------------------------------------------------- sections
@dataclass
class Section:
    name: str                                   # "prefill" | "decode"
    min_len: int
    default: Rule
    layers: dict[int, dict[Any, Rule]]          # layer -> {head index or "*": Rule}
    block_size: int = 64
    granularity: str = "group"                  # estimate per kv group (shared K/V blocks) or per "head"

    def rule(self, layer: int, head: int) -> Rule:
        entry = self.layers.get(layer)
        if entry:
            if head in entry:
                return entry[head]
            if "*" in entry:
                return entry["*"]
        return self.default


@dataclass
class ModelSpec:
    architecture: str | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None


@dataclass
class Plan:
    model: ModelSpec
    prefill: Section
    decode: Section
    profile: dict = field(default_factory=dict)
    version: int = PLAN_VERSION
    source: str | None = None

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"sparse_infer_plan": self.version}
        out["model"] = {k: v for k, v in vars(self.model).items() if v is not None}
        if self.profile:
            out["profile"] = copy.deepcopy(self.profile)
        for sec, len_key, name_key in ((self.prefill, "min_seq_len", "pattern"), (self.decode, "min_kv_len", "method")):
            d: dict[str, Any] = {len_key: sec.min_len}
            if sec.name == "prefill":
                d["block_size"] = sec.block_size
            d["granularity"] = sec.granularity
            d["default"] = sec.default.to_yaml(name_key)
            if sec.layers:
                d["layers"] = {
                    layer: {head: rule.to_yaml(name_key) for head, rule in heads.items()}
                    for layer, heads in sorted(sec.layers.items())
                }
            out[sec.name] = d
        return out

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120))
        return path

    # -------------------------------------------------------------- checks against a model
    def check_model(self, config) -> None:
        """Raise PlanError when this plan was written for a different model shape."""
        actual = model_spec_from_config(config)
        for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            want = getattr(self.model, key)
            got = getattr(actual, key)
            if want is not None and got is not None and want != got:
                raise PlanError(f"model.{key}", f"plan is for {want}, this model has {got} (plan for another model?)")
        if self.model.architecture and actual.architecture and self.model.architecture != actual.architecture:
            raise PlanError("model.architecture",
                            f"plan is for {self.model.architecture}, this model is {actual.architecture}")
        layers, heads = actual.num_hidden_layers, actual.num_attention_heads
        for sec in (self.prefill, self.decode):
            for layer, entry in sec.layers.items():
                if layers is not None and layer >= layers:
                    raise PlanError(f"{sec.name}.layers.{layer}", f"layer index out of range: model has {layers} layers")
                for head, rule in entry.items():
                    if head != "*" and heads is not None and head >= heads:
                        raise PlanError(f"{sec.name}.layers.{layer}.{head}",
                                        f"head index out of range: model has {heads} attention heads")
                    chans = rule.params.get("channels")
                    if isinstance(chans, list) and actual.head_dim and max(chans) >= actual.head_dim:
                        raise PlanError(f"{sec.name}.layers.{layer}.{head}.channels",
                                        f"channel index {max(chans)} out of range: head_dim is {actual.head_dim}")
            if isinstance(sec.default.params.get("channels"), list) and actual.head_dim:
                if max(sec.default.params["channels"]) >= actual.head_dim:
                    raise PlanError(f"{sec.name}.default.channels", f"channel index out of range: head_dim is {actual.head_dim}")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_spec_from_config(config) -> ModelSpec:
    tc = _text_config(config)
    heads = getattr(tc, "num_attention_heads", None)
    hidden = getattr(tc, "hidden_size", None)
    head_dim = getattr(tc, "head_dim", None) or (hidden // heads if hidden and heads else None)
    archs = getattr(config, "architectures", None) or []
    return ModelSpec(
        architecture=archs[0] if archs else None,
        num_hidden_layers=getattr(tc, "num_hidden_layers", None),
        num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


# --------------------------------------------------------------------------- parsing
_TOP_KEYS = {"sparse_infer_plan", "model", "profile", "prefill", "decode"}
_SECTION_KEYS = {
    "prefill": {"min_seq_len", "block_size", "granularity", "default", "layers"},
    "decode": {"min_kv_len", "granularity", "default", "layers"},
}


def _parse_section(raw, name: str) -> Section:
    len_key = "min_seq_len" if name == "prefill" else "min_kv_len"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise PlanError(name, f"must be a mapping, got {raw!r}")
    for key in raw:
        if key not in _SECTION_KEYS[name]:
            raise PlanError(f"{name}.{key}", f"unknown key; allowed: {', '.join(sorted(_SECTION_KEYS[name]))}")
    min_len = _nonneg_int(raw.get(len_key, 4096), f"{name}.{len_key}")
    block_size = 64
    if name == "prefill":
        block_size = _pos_int(raw.get("block_size", 64), "prefill.block_size")
        if block_size & (block_size - 1) or block_size < 16:
            raise PlanError("prefill.block_size", f"must be a power of two >= 16, got {block_size}")
    granularity = raw.get("granularity", "group")
    if granularity not in ("group", "head"):
        raise PlanError(f"{name}.granularity", f"must be 'group' or 'head', got {granularity!r}")
    name_key = "pattern" if name == "prefill" else "method"
    default = parse_rule(raw.get("default", {name_key: "dense"}), f"{name}.default", name)
    layers: dict[int, dict[Any, Rule]] = {}
    raw_layers = raw.get("layers") or {}
    if not isinstance(raw_layers, Mapping):
        raise PlanError(f"{name}.layers", "must be a mapping of layer index -> {head: rule}")
    for layer, heads in raw_layers.items():
        lpath = f"{name}.layers.{layer}"
        if not _is_int(layer) or layer < 0:
            raise PlanError(lpath, "layer keys must be non-negative integers")
        if not isinstance(heads, Mapping) or not heads:
            raise PlanError(lpath, "must be a non-empty mapping of head index or '*' -> rule")
        entry = {}
        for head, rule in heads.items():
            hpath = f"{lpath}.{head}"
            if head != "*" and (not _is_int(head) or head < 0):
                raise PlanError(hpath, "head keys must be non-negative integers or '*'")
            entry[head] = parse_rule(rule, hpath, name)
        layers[layer] = entry
    return Section(name, min_len, default, layers, block_size, granularity)


def plan_from_dict(raw: Mapping, source: str | None = None) -> Plan:
    if not isinstance(raw, Mapping):
        raise PlanError("", f"a plan must be a YAML mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise PlanError(str(key), f"unknown top-level key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    version = raw.get("sparse_infer_plan")
    if version != PLAN_VERSION:
        raise PlanError("sparse_infer_plan", f"must be {PLAN_VERSION} (the plan schema version), got {version!r}")
    mraw = raw.get("model") or {}
    if not isinstance(mraw, Mapping):
        raise PlanError("model", "must be a mapping")
    mkeys = set(vars(ModelSpec()))
    for key, value in mraw.items():
        if key not in mkeys:
            raise PlanError(f"model.{key}", f"unknown key; allowed: {', '.join(sorted(mkeys))}")
        if key != "architecture":
            _pos_int(value, f"model.{key}")
    profile = raw.get("profile") or {}
    if not isinstance(profile, Mapping):
        raise PlanError("profile", "must be a mapping")
    return Plan(
        model=ModelSpec(**mraw),
        prefill=_parse_section(raw.get("prefill"), "prefill"),
        decode=_parse_section(raw.get("decode"), "decode"),
        profile=dict(profile),
        version=version,
        source=source,
    )


def shipped_plan_path(name: str) -> Path | None:
    path = CONFIGS_DIR / f"{name}.yaml"
    return path if path.exists() else None


def load_plan(plan, model_config=None) -> Plan:
    """Accept a Plan, a dict, a YAML path, a shipped plan name, or a preset name (needs model_config)."""
    if isinstance(plan, Plan):
        result = plan
    elif isinstance(plan, Mapping):
        result = plan_from_dict(plan)
    elif isinstance(plan, (str, Path)):
        text = str(plan)
        if text in PRESETS and not Path(text).exists():
            if model_config is None:
                raise PlanError("", f"preset {text!r} needs the model's config to be built")
            result = preset(text, model_config)
        else:
            path = Path(text)
            if not path.exists() and shipped_plan_path(text):
                path = shipped_plan_path(text)
            if not path.exists():
                raise PlanError("", f"plan file not found: {text!r} (give a YAML path, a shipped plan name "
                                    f"or a preset: {', '.join(PRESETS)})")
            try:
                raw = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise PlanError("", f"{path} is not valid YAML: {exc}") from exc
            result = plan_from_dict(raw, source=str(path))
    else:
        raise PlanError("", f"cannot make a plan from {type(plan).__name__}")
    if model_config is not None:
        result.check_model(model_config)
    return result


# --------------------------------------------------------------------------- presets
def preset(name: str, model_config, min_seq_len: int = 4096, min_kv_len: int = 4096) -> Plan:
    """A plan built from a model's config alone, without profiling.

    Layer 0 stays dense in the sparse presets: its attention is diffuse in most
    LLMs and it is a small share of the compute.
    """
    if name not in PRESETS:
        raise PlanError("", f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    spec = model_spec_from_config(model_config)
    defaults = {
        "dense": {"pattern": "dense"},
        # the dense tail lets the prompt's last rows (the question) reach the middle; without
        # it these presets lost 10.5 (a_shape) and 7.9 (block) points to dense on RULER at
        # SmolLM2 8K (docs/RESULTS.md)
        "a_shape": {"pattern": "a_shape", "sink": 128, "local": 1024, "dense_tail": 128},
        # slash lines become whole kv blocks in the executor, so their budget is kept small
        "vertical_slash": {"pattern": "vertical_slash", "vertical": {"frac": 0.03, "min": 256, "max": 2048},
                           "slash": {"frac": 0.02, "min": 256, "max": 2048}},
        # the antidiagonal (XAttention) estimate, not the pooled one: at Qwen2.5-0.5B 8K on RULER it
        # changed 3 of 55 answers against dense where pooled changed 7 (niah_multivalue 95 vs 75),
        # for ~8% more prefill time at 16K (1.26x vs 1.36x over dense; docs/RESULTS.md)
        "block": {"pattern": "block", "coverage": 0.95, "estimator": "antidiagonal", "dense_tail": 128},
    }
    raw = {
        "sparse_infer_plan": PLAN_VERSION,
        "model": {k: v for k, v in vars(spec).items() if v is not None},
        "profile": {"preset": name, "created": datetime.date.today().isoformat()},
        "prefill": {"min_seq_len": min_seq_len, "block_size": 64, "default": defaults[name]},
        "decode": {"min_kv_len": min_kv_len, "default": {"method": "dense"}},
    }
    if name != "dense":
        raw["prefill"]["layers"] = {0: {"*": {"pattern": "dense"}}}
    return plan_from_dict(raw, source=f"preset:{name}")
