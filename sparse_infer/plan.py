"""The per-head plan: schema (version 1), YAML load/save, validation and presets.

The rule schema is generated from the method registry (sparse_infer.methods): a rule's
`pattern` / `method` names a registered class, whose `params` give the keys, parsers and
defaults and whose check hooks hold the cross-field checks.

Every error is a PlanError whose message starts with the YAML path of the bad
field (e.g. ``prefill.layers.7.3.vertical``) and says what was expected.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

# the built-in methods register themselves when their packages are imported
import sparse_infer.decode  # noqa: F401
import sparse_infer.prefill  # noqa: F401
from sparse_infer.methods import DENSE, REQUIRED, methods_of
from sparse_infer.params import Budget, PlanError, count_error, is_int, positive_int

PLAN_VERSION = 1
# shipped plans are package data, so they exist in a wheel install as in a checkout
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# The executors build (block_size x block_size) tiles per head: 1024 keeps one tile at 4 MiB,
# where 65536 asked for tens of GiB even for a short prompt.
MAX_BLOCK_SIZE = 1024
# Plans nest five levels deep; anything far deeper is not a plan (and would exhaust the stack).
MAX_NESTING = 64
# The last top-level key of every plan file sparse_infer writes: a file cut short lacks it.
COMPLETE_KEY = "complete"


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


def schema(section: str) -> dict[str, dict]:
    """{name: {key: Param}} of a section: dense (no parameters) and every registered method."""
    return {DENSE: {}, **{name: method.params for name, method in methods_of(section).items()}}


def parse_rule(raw, path: str, section: str) -> Rule:
    name_key = "pattern" if section == "prefill" else "method"
    table = schema(section)
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
        params[key] = spec[key].parse(value, f"{path}.{key}")
        explicit.append(key)
    for key, param in spec.items():
        if key not in params:
            if param.default is REQUIRED:
                raise PlanError(f"{path}.{key}", f"missing; {name_key} {kind!r} requires it")
            params[key] = param.default
    if kind != DENSE:
        methods_of(section)[kind].check(params, path)
    return Rule(kind, params, tuple(explicit))


# --------------------------------------------------------------------------- sections
@dataclass
class Section:
    name: str                                   # "prefill" | "decode"
    min_len: int
    default: Rule
    layers: dict[int, dict[Any, Rule]]          # layer -> {head index or "*": Rule}
    block_size: int = 64
    granularity: str = "group"                  # estimate per kv group (shared K/V blocks), "subgroup", or per "head"

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

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the plan as YAML, ending with `complete: true`; an existing file is kept unless overwrite."""
        text = yaml.safe_dump(self.to_document(), sort_keys=False, default_flow_style=None, width=120)
        return write_plan_text(path, text, overwrite=overwrite)

    def to_document(self) -> dict:
        """What a plan file holds: to_dict() and, last, the completeness marker."""
        return {**self.to_dict(), COMPLETE_KEY: True}

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
            _check_channels(sec, actual.head_dim, "the model's head_dim")


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
_TOP_KEYS = {"sparse_infer_plan", "model", "profile", "prefill", "decode", COMPLETE_KEY}
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
    min_len = raw.get(len_key, 4096)
    # a threshold, only compared with lengths: a huge one ("never sparse") is fine and needs no bound
    if not is_int(min_len) or min_len < 0:
        raise count_error(f"{name}.{len_key}", min_len, "a non-negative integer")
    block_size = 64
    if name == "prefill":
        block_size = positive_int(raw.get("block_size", 64), "prefill.block_size")
        if block_size & (block_size - 1) or not 16 <= block_size <= MAX_BLOCK_SIZE:
            raise PlanError("prefill.block_size",
                            f"must be a power of two from 16 to {MAX_BLOCK_SIZE}, got {block_size}")
    granularity = raw.get("granularity", "group")
    # "subgroup" (prefill): a rule's heads in a partly covered GQA group share the group's K/V and
    # one index too (decode selects per group or per head only)
    allowed = ("group", "subgroup", "head") if name == "prefill" else ("group", "head")
    if granularity not in allowed:
        raise PlanError(f"{name}.granularity",
                        f"must be {', '.join(repr(a) for a in allowed[:-1])} or {allowed[-1]!r}, got {granularity!r}")
    name_key = "pattern" if name == "prefill" else "method"
    default = parse_rule(raw.get("default", {name_key: "dense"}), f"{name}.default", name)
    layers: dict[int, dict[Any, Rule]] = {}
    raw_layers = raw.get("layers") or {}
    if not isinstance(raw_layers, Mapping):
        raise PlanError(f"{name}.layers", "must be a mapping of layer index -> {head: rule}")
    for layer, heads in raw_layers.items():
        lpath = f"{name}.layers.{layer}"
        if not is_int(layer) or layer < 0:
            raise PlanError(lpath, "layer keys must be non-negative integers")
        if not isinstance(heads, Mapping) or not heads:
            raise PlanError(lpath, "must be a non-empty mapping of head index or '*' -> rule")
        entry = {}
        for head, rule in heads.items():
            hpath = f"{lpath}.{head}"
            if head != "*" and (not is_int(head) or head < 0):
                raise PlanError(hpath, "head keys must be non-negative integers or '*'")
            entry[head] = parse_rule(rule, hpath, name)
        layers[layer] = entry
    section = Section(name, min_len, default, layers, block_size, granularity)
    for rpath, layer, rule in _section_rules(section):
        if rule.kind != DENSE:
            methods_of(name)[rule.kind].check_section(rule, rpath, section, layer)
    return section


def _section_rules(section: Section):
    """(YAML path, layer or None for the default, rule) for every rule of a section."""
    yield f"{section.name}.default", None, section.default
    for layer, entry in section.layers.items():
        for head, rule in entry.items():
            yield f"{section.name}.layers.{layer}.{head}", layer, rule


def _check_channels(section: Section, head_dim: int | None, where: str) -> None:
    """Checks of each rule against the model's head_dim (e.g. Double Sparsity's `channels`)."""
    if not head_dim:
        return
    for rpath, _, rule in _section_rules(section):
        if rule.kind != DENSE:
            methods_of(section.name)[rule.kind].check_head_dim(rule, rpath, head_dim, where)


def plan_from_dict(raw: Mapping, source: str | None = None) -> Plan:
    if not isinstance(raw, Mapping):
        raise PlanError("", f"a plan must be a YAML mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise PlanError(str(key), f"unknown top-level key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    version = raw.get("sparse_infer_plan")
    if not is_int(version) or version != PLAN_VERSION:     # True == 1 in Python: not a version
        raise PlanError("sparse_infer_plan", f"must be {PLAN_VERSION} (the plan schema version), got {version!r}")
    mraw = raw.get("model") or {}
    if not isinstance(mraw, Mapping):
        raise PlanError("model", "must be a mapping")
    mkeys = set(vars(ModelSpec()))
    for key, value in mraw.items():
        if key not in mkeys:
            raise PlanError(f"model.{key}", f"unknown key; allowed: {', '.join(sorted(mkeys))}")
        if key == "architecture":
            if not isinstance(value, str) or not value:
                raise PlanError("model.architecture", f"must be a class name such as LlamaForCausalLM, got {value!r}")
        else:
            positive_int(value, f"model.{key}")
    profile = raw.get("profile") or {}
    if not isinstance(profile, Mapping):
        raise PlanError("profile", "must be a mapping")
    if COMPLETE_KEY in raw and raw[COMPLETE_KEY] is not True:
        raise PlanError(COMPLETE_KEY, f"must be true (written last, to show the file is whole), "
                                      f"got {raw[COMPLETE_KEY]!r}")
    plan = Plan(
        model=ModelSpec(**mraw),
        prefill=_parse_section(raw.get("prefill"), "prefill"),
        decode=_parse_section(raw.get("decode"), "decode"),
        profile=dict(profile),
        version=version,
        source=source,
    )
    _check_channels(plan.decode, plan.model.head_dim, "model.head_dim")
    return plan


def shipped_plan_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def shipped_plan_path(name: str) -> Path | None:
    """The plan shipped for model `name` (a bare name, never a path), or None."""
    return CONFIGS_DIR / f"{name}.yaml" if name in shipped_plan_names() else None


# --------------------------------------------------------------------------- reading and writing files
class _PlanLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently) and deep nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._paths: dict[int, str] = {}

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise PlanError("", f"nesting deeper than {MAX_NESTING} levels at line {mark.line + 1}: "
                                    f"not a plan")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        # name every mapping by its YAML path first, so a duplicate key can be reported where it is
        stack, visited = [(node, "")], set()
        while stack:
            current, path = stack.pop()
            if id(current) in visited:      # an alias: walked once, so nested aliases cannot blow up the walk
                continue
            visited.add(id(current))
            if isinstance(current, yaml.MappingNode):
                self._paths[id(current)] = path
                for key, value in current.value:
                    label = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    stack.append((value, f"{path}.{label}" if path else str(label)))
            elif isinstance(current, yaml.SequenceNode):
                stack.extend((item, f"{path}.{i}") for i, item in enumerate(current.value))
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue    # unhashable: the base constructor reports it
                if first is not key_node:
                    parent = self._paths.get(id(node), "")
                    raise PlanError(f"{parent}.{key}" if parent else str(key),
                                    f"duplicate key (lines {first.start_mark.line + 1} and "
                                    f"{key_node.start_mark.line + 1}); YAML would keep only the last")
        return super().construct_mapping(node, deep=deep)


def _one_line_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}"


def read_plan_file(path) -> dict:
    """Parse a plan file into its raw mapping; every failure is a one-line PlanError."""
    path = Path(path)
    if path.is_dir():
        raise PlanError("", f"{path} is a directory, not a plan file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PlanError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError("", f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from exc
    try:
        raw = yaml.load(text, Loader=_PlanLoader)   # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PlanError("", f"{path} is not valid YAML: {_one_line_yaml_error(exc)}") from exc
    except RecursionError as exc:        # a guard of last resort: MAX_NESTING stops it first
        raise PlanError("", f"{path} nests too deeply: not a plan") from exc
    _check_whole_file(raw, path)
    return raw


def _check_whole_file(raw, path: Path) -> None:
    """A file cut short must not load as a smaller (denser) plan.

    Both sections must be present; a file with a `profile` section (every file the profiler,
    `plan preset` or Plan.save writes) must end with `complete: true`. Hand-written plans without
    a `profile` section may end with it too, and are then checked the same way.
    """
    if not isinstance(raw, Mapping):
        return      # plan_from_dict reports what it got
    for section in ("prefill", "decode"):
        if raw.get(section) is None:
            raise PlanError(section, f"missing in {path}: a plan file states both sections (write "
                                     f"`{section}: {{default: {{{'pattern' if section == 'prefill' else 'method'}: "
                                     f"dense}}}}` for a dense one); was the file cut short?")
    if "profile" in raw or COMPLETE_KEY in raw:
        if COMPLETE_KEY not in raw:
            raise PlanError(COMPLETE_KEY, f"missing: {path} has a profile section but does not end with "
                                          f"`complete: true`, so it may have been cut short; write it again")
        if list(raw)[-1] != COMPLETE_KEY:
            raise PlanError(COMPLETE_KEY, f"must be the last key of {path} (it marks the end of the file), "
                                          f"found before {list(raw)[-1]!r}")


def write_plan_text(path, text: str, *, overwrite: bool = False) -> Path:
    """Write `text` to `path` atomically: a temp file in the same directory, then a rename.

    Readers see the old file or the whole new one, never a part; without `overwrite` an
    existing file is never replaced (FileExistsError).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; not overwritten")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)   # mkstemp makes 0600; a plan is readable like any file written with open()
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)      # fails if the name appeared meanwhile; replace() would clobber it
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while writing; not overwritten") from None
            except OSError:             # no hard links on this filesystem
                if path.exists():
                    raise FileExistsError(f"{path} appeared while writing; not overwritten") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_plan(plan, model_config=None) -> Plan:
    """Accept a Plan, a dict, a YAML path, a shipped plan name, or a preset name (needs model_config)."""
    from sparse_infer import presets          # presets build plans with this module: imported on use
    if isinstance(plan, Plan):
        result = plan
    elif isinstance(plan, Mapping):
        result = plan_from_dict(plan)
    elif isinstance(plan, (str, Path)):
        text = str(plan)
        path = Path(text)
        if path.is_file():
            result = plan_from_dict(read_plan_file(path), source=str(path))
        elif isinstance(plan, str) and text in presets.PRESETS:
            if model_config is None:
                raise PlanError("", f"preset {text!r} needs the model's config to be built")
            result = presets.preset(text, model_config)
        elif isinstance(plan, str) and shipped_plan_path(text):
            shipped = shipped_plan_path(text)
            result = plan_from_dict(read_plan_file(shipped), source=str(shipped))
        elif path.exists():
            read_plan_file(path)        # says why it is not a plan file (a directory, ...)
            raise PlanError("", f"{path} is not a plan file")
        else:
            raise PlanError("", f"plan file not found: {text!r} (give a YAML path, a shipped plan name "
                                f"({', '.join(shipped_plan_names()) or 'none installed'}) "
                                f"or a preset ({', '.join(presets.PRESETS)}))")
    else:
        raise PlanError("", f"cannot make a plan from {type(plan).__name__}")
    if model_config is not None:
        result.check_model(model_config)
    return result
