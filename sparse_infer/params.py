"""Plan values every method shares: the PlanError type, token budgets and the field parsers
a method's parameters are declared with (sparse_infer.methods.Param).

Every parser takes (value, YAML path) and raises a PlanError whose message starts with that path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

# Every token or block count in a plan is at most this: far above any model's context, far
# below where index arithmetic overflows int64 or a budget-sized tensor exhausts memory.
MAX_COUNT = 1 << 24


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


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _looks_numeric(value) -> bool:
    """'1e21' in YAML is a string (YAML floats need a dot): say so rather than 'got a string'."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def count_error(path: str, value, what: str) -> PlanError:
    if isinstance(value, float) or _looks_numeric(value):
        return PlanError(path, f"must be {what} written as an integer (at most {MAX_COUNT}), got {value!r}")
    return PlanError(path, f"must be {what}, got {value!r}")


def bounded(value: int, path: str) -> int:
    if value > MAX_COUNT:
        raise PlanError(path, f"{value} is beyond the maximum of {MAX_COUNT} (2**24) tokens or blocks")
    return value


def parse_budget(value, path: str) -> Budget:
    if is_int(value):
        if value <= 0:
            raise PlanError(path, f"budget must be a positive token count, got {value}")
        return Budget(fixed=bounded(value, path))
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
                if not is_int(value[key]) or value[key] <= 0:
                    raise count_error(f"{path}.{key}", value[key], "a positive integer")
                bounds[key] = bounded(value[key], f"{path}.{key}")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise PlanError(f"{path}.min", f"min ({bounds['min']}) exceeds max ({bounds['max']})")
        return Budget(frac=float(frac), **bounds)
    if isinstance(value, float) or _looks_numeric(value):
        raise PlanError(path, f"budget must be a positive integer (at most {MAX_COUNT}) or {{frac, min, max}}, "
                              f"got {value!r}")
    raise PlanError(path, f"budget must be a positive integer or {{frac, min, max}}, got {value!r}")


# --------------------------------------------------------------------------- field kinds
def positive_int(value, path):
    if not is_int(value) or value <= 0:
        raise count_error(path, value, "a positive integer")
    return bounded(value, path)


def nonneg_int(value, path):
    if not is_int(value) or value < 0:
        raise count_error(path, value, "a non-negative integer")
    return bounded(value, path)


def distance(value, path):
    """A Jensen-Shannon distance threshold (sqrt of the divergence in nats: 0 .. sqrt(ln 2))."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise PlanError(path, f"must be a Jensen-Shannon distance in [0, 1], got {value!r}")
    return float(value)


def fraction(value, path):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise PlanError(path, f"must be a number in (0, 1], got {value!r}")
    return float(value)
