"""The sweep file: a base config plus overrides, and axes that expand into points with stable, readable names.

```yaml
name: lr-width                    # the sweep: sweeps/<name>/ (default: the file's name)
base: configs/demo.yaml           # the config every point starts from (paths relative to where you run)
overrides: {train.steps: 200}     # for every point
axes:                             # crossed with each other
  optim.lr: {logspace: [1e-4, 1e-2, 5]}      # 5 values evenly spaced in log (1e-4, 3.162e-4, ... 1e-2)
  model.dim: [128, 256]                      # a list
  optim.warmup_steps: {linspace: [10, 50, 3]}
zip:                              # axes that vary together (one more crossed axis)
  - {model.n_layers: [2, 4], model.n_heads: [2, 4]}
random:                           # `count` seeded draws (one more crossed axis)
  {count: 4, seed: 0, axes: {optim.weight_decay: {loguniform: [1e-3, 1e-1]}, train.seed: {randint: [0, 99]}}}
skip:                             # points matching every key of an entry are left out
  - {model.dim: 256, optim.lr: [1e-2]}
skip_invalid: false               # true: leave out points that fail the config checks (listed) instead of refusing
name_keys: [optim.lr, model.dim]  # the swept keys a point's name is made of (default: all of them)
```

A point's name joins `<key>-<value>` for every swept key, or those of `name_keys` (the key's last component:
`lr-3e-4_dim-256`); its job is `<sweep>.<point>`, so two sweeps never share a job directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from trainer.core.config import NAME_PATTERN
from trainer.core.layers import ConfigError, config_field, read_yaml

NAME_LIMIT = 100


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Linspace(_Spec):
    linspace: tuple[float, float, Annotated[int, Field(ge=1)]]
    """[start, stop, num]: num values evenly spaced, both ends included (4 significant digits)."""


class Logspace(_Spec):
    logspace: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[int, Field(ge=1)]]
    """[start, stop, num]: num values evenly spaced in log, both ends included (start and stop are the values, not
    exponents; 4 significant digits, so that names stay readable: 1e-3, 3.162e-3, 1e-2)."""


class Values(_Spec):
    values: list[Any]


class Uniform(_Spec):
    uniform: tuple[float, float]


class LogUniform(_Spec):
    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]


class RandInt(_Spec):
    randint: tuple[int, int]
    """[low, high], both included."""


class Choice(_Spec):
    choice: Annotated[list[Any], Field(min_length=1)]


Axis = list[Any] | Values | Linspace | Logspace
Distribution = Uniform | LogUniform | RandInt | Choice


class RandomAxes(_Spec):
    count: int = Field(ge=1, le=100_000)
    seed: int = 0
    axes: dict[str, Distribution]


class SweepFile(_Spec):
    name: str | None = None
    base: str | None = None
    overrides: dict[str, Any] | list[str] = {}
    axes: dict[str, Axis] = {}
    zip: list[dict[str, list[Any]]] = []
    random: RandomAxes | None = None
    skip: list[dict[str, Any]] = []
    skip_invalid: bool = False
    name_keys: list[str] | None = None
    """The swept keys a point's name is made of (default: all): leave out keys that follow from the others (a
    width's head count), so that names stay short. Two points may not end with one name."""


@dataclass(frozen=True)
class Point:
    name: str
    """Readable and stable: derived from the values alone."""
    values: dict[str, Any]
    """Swept key -> value, in the order of the sweep file."""


def format_value(value: Any) -> str:
    """A value as it appears in a point name: `3e-4`, `0.1`, `256`, `true`, `cosine`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e6:
            return str(int(value))
        if value != 0 and (abs(value) < 0.1 or abs(value) >= 1e6):
            mantissa, exponent = f"{value:.5e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.6g}"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}-{format_value(v)}" for k, v in value.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-") or "x"


def _labels(keys: list[str]) -> dict[str, str]:
    """Each key's label: its last component, or as many trailing components as make it unique."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if sum(1 for other in keys if other.split(".")[-n:] == parts[-n:]) == 1:
                break
        labels[key] = label
    return labels


def point_name(values: dict[str, Any], labels: dict[str, str], limit: int) -> str:
    name = "_".join(f"{labels[k]}-{format_value(v)}" for k, v in values.items()) or "base"
    if len(name) > limit:  # still stable and unique: a digest of the values
        digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{name[:limit - 11].rstrip('._-')}-{digest}"
    return name


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _linspace(start: float, stop: float, num: int) -> list[Any]:
    values = np.linspace(start, stop, num).tolist()
    if float(start).is_integer() and float(stop).is_integer() and all(float(v).is_integer() for v in values):
        return [int(v) for v in values]
    return [_round(v) for v in values]


def _axis_values(axis: Axis) -> list[Any]:
    if isinstance(axis, list):
        return axis
    if isinstance(axis, Values):
        return axis.values
    if isinstance(axis, Linspace):
        return _linspace(*axis.linspace)
    start, stop, num = axis.logspace
    return [_round(v) for v in np.geomspace(start, stop, num)]


def _draw(distribution: Distribution, rng: np.random.Generator) -> Any:
    if isinstance(distribution, Uniform):
        return float(rng.uniform(*distribution.uniform))
    if isinstance(distribution, LogUniform):
        low, high = distribution.loguniform
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    if isinstance(distribution, RandInt):
        low, high = distribution.randint
        return int(rng.integers(low, high, endpoint=True))
    return distribution.choice[int(rng.integers(len(distribution.choice)))]


def _canonical(key: str, value: Any) -> Any:
    """A value as the config field holds it (YAML reads `1e-4` as text; `optim.lr` makes it the float 0.0001), so
    that names, skip rules and plots see numbers; a value the field refuses stays as written (the point's config
    check names it)."""
    field = config_field(key)
    if field is None:
        return value
    try:
        canonical = TypeAdapter(field).validate_python(value)
    except (ValidationError, TypeError, ValueError):
        return value
    return canonical if isinstance(canonical, str | int | float | bool | type(None)) else value


def _matches(rule: dict[str, Any], values: dict[str, Any]) -> bool:
    for key, wanted in rule.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if key not in values or not any(_same(values[key], option) for option in options):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


@dataclass(frozen=True)
class Sweep:
    name: str
    file: Path
    spec: SweepFile
    points: list[Point]
    skipped: list[Point]

    @property
    def keys(self) -> list[str]:
        """The swept config keys, in the order of the sweep file."""
        return list(self.points[0].values) if self.points else []

    def job_name(self, point: Point) -> str:
        return f"{self.name}.{point.name}"

    def base_overrides(self) -> list[str]:
        """The sweep's own overrides as `key=value` items."""
        overrides = self.spec.overrides
        if isinstance(overrides, list):
            return list(overrides)
        return [f"{key}={override_text(value)}" for key, value in overrides.items()]


def override_text(value: Any) -> str:
    """A value as a command-line override takes it (the config coerces it to the field's type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | dict | tuple):
        return json.dumps(value)
    return str(value)


def read_sweep(path: Path) -> Sweep:
    """Parse and expand a sweep file; a ConfigError lists every problem (the file, and which axis)."""
    data = read_yaml(path, what="sweep file")
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as exc:
        problems = [f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(problems, "invalid sweep file") from None
    problems = []
    grid: list[list[dict[str, Any]]] = []
    for key, axis in spec.axes.items():
        values = [_canonical(key, v) for v in _axis_values(axis)]
        if not values:
            problems.append(f"{path}: axes.{key}: no values (an empty axis would give no points)")
        grid.append([{key: v} for v in values])
    for i, group in enumerate(spec.zip):
        lengths = {key: len(values) for key, values in group.items()}
        if not group or len(set(lengths.values())) != 1 or 0 in lengths.values():
            problems.append(f"{path}: zip.{i}: the paired axes need the same, non-zero number of values "
                            f"(got {', '.join(f'{k}: {n}' for k, n in lengths.items()) or 'none'})")
            continue
        keys = list(group)
        grid.append([{k: _canonical(k, v) for k, v in zip(keys, combo, strict=True)}
                     for combo in zip(*group.values(), strict=True)])
    if spec.random is not None:
        rng = np.random.default_rng(spec.random.seed)
        draws = [{key: _canonical(key, _draw(d, rng)) for key, d in spec.random.axes.items()}
                 for _ in range(spec.random.count)]
        if spec.random.axes:
            grid.append(draws)
    swept = [key for axis in grid for key in (axis[0] if axis else {})]
    seen = set()
    for key in swept:
        if key in seen:
            problems.append(f"{path}: '{key}' is swept twice (in axes, zip or random): keep it in one place")
        seen.add(key)
        if key == "job.name":
            problems.append(f"{path}: job.name cannot be swept: each point's job is named after its values")
        elif config_field(key) is None:
            problems.append(f"{path}: '{key}' is not a config field; {config_field_hint(key)}")
    overridden = spec.overrides if isinstance(spec.overrides, dict) else [i.partition("=")[0] for i in spec.overrides]
    for key in overridden:
        if key == "job.name":
            problems.append(f"{path}: overrides: job.name cannot be set: each point's job is <sweep>.<point>")
        elif key in seen:
            problems.append(f"{path}: overrides: '{key}' is also swept; set it in one place")
    for i, rule in enumerate(spec.skip):
        for key in rule:
            if key not in seen:
                problems.append(f"{path}: skip.{i}: '{key}' is not a swept key (swept: {', '.join(swept) or 'none'})")
    for key in spec.name_keys or []:
        if key not in seen:
            problems.append(f"{path}: name_keys: '{key}' is not a swept key (swept: {', '.join(swept) or 'none'})")
    if problems:
        raise ConfigError(problems, "invalid sweep file")

    naming = [key for key in swept if spec.name_keys is None or key in spec.name_keys]
    labels = _labels(naming)
    name = spec.name or path.stem
    limit = NAME_LIMIT - len(name) - 1
    points, skipped, by_name = [], [], {}
    rules = [{k: [_canonical(k, v) for v in (w if isinstance(w, list) else [w])] for k, w in rule.items()}
             for rule in spec.skip]
    for combo in itertools.product(*grid):
        values = {k: v for part in combo for k, v in part.items()}
        point = Point(point_name({k: values[k] for k in naming}, labels, limit), values)
        if any(_matches(rule, values) for rule in rules):
            skipped.append(point)
            continue
        if point.name in by_name:
            problems.append(f"{path}: two points are named {point.name}: {by_name[point.name]} and {values} "
                            "(values that differ only beyond 6 significant digits, an axis listing a value "
                            "twice, or name_keys leaving out a key that tells them apart); make them differ")
        by_name[point.name] = values
        points.append(point)
    if not re.fullmatch(NAME_PATTERN, name):
        problems.append(f"{path}: the sweep name '{name}' must be letters, digits, '.', '_' or '-' (set name:)")
    if not points and not problems:
        problems.append(f"{path}: every point is skipped: nothing to run")
    if problems:
        raise ConfigError(problems, "invalid sweep file")
    return Sweep(name, path, spec, points, skipped)


def config_field_hint(key: str) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    model = config_field(parent) if parent else None
    fields = list(getattr(model, "model_fields", {})) if model is not None else []
    return f"fields of {parent}: {', '.join(fields)}" if fields else "give a dotted path such as optim.lr"
