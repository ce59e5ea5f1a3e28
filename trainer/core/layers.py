"""Where a config comes from: defaults < model flavor < cluster profile < YAML file < `ANVIL_*` environment < CLI.

Each source becomes plain nested data here (the YAML file and the profile read, `a.b=value` overrides and
`ANVIL_*` variables parsed); the layers are deep-merged and validated once against the tree in `config.py`.
Every failure becomes one readable line per problem naming the field, the offending value and its source.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.core.config import (
    ENV_NAME,
    MODEL_FLAVORS,
    NAME_PATTERN,
    SBATCH_WORD,
    SECRET_NAME,
    SECTIONS,
    AnvilConfig,
)
from trainer.core.errors import AnvilError

PROFILES_DIR = Path(str(importlib.resources.files("trainer.core") / "clusters"))
ENV_PREFIX = "ANVIL_"
RUNTIME_ENV = frozenset({"ANVIL_EXECUTOR", "ANVIL_JOBS_DIR", "ANVIL_SWEEPS_DIR", "ANVIL_SLURM_NODES",
                         "ANVIL_REQUIRE_SLURM"})
"""`ANVIL_*` variables that steer the tools rather than the config; every other one must name a field."""

PATTERN_HELP = {
    NAME_PATTERN: "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 100 characters",
    SBATCH_WORD: "a plain word for an #SBATCH line (letters, digits and _@%+=:,./[]- only; no spaces or quotes)",
    ENV_NAME: "a shell variable name (letters, digits and '_', not starting with a digit)",
    r"^[a-z][a-z-]*$": "an sbatch long option name such as 'constraint' or 'reservation'",
    r"^\d+[KMGT]?$": "a memory size such as 0, 4000, 64G or 480G",
}


class ConfigError(AnvilError):
    """A config that cannot run; carries one readable line per problem."""

    def __init__(self, problems: list[str], header: str = "invalid configuration"):
        self.problems = problems
        self.header = header
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when present
    """PyYAML keeps the last of duplicate keys silently; a config with two `lr:` lines is a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from `path`, or a ConfigError that names the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{what} '{path}' does not exist"], "cannot read config") from None
    except IsADirectoryError:
        raise ConfigError([f"{what} '{path}' is a directory, expected a YAML file"], "cannot read config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{what} '{path}' cannot be read: {exc}"], "cannot read config") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{what} '{path}' is not valid YAML{where}: {problem}"], "cannot read config") from None
    if data is None:
        raise ConfigError([f"{what} '{path}' is empty (or only comments): it holds no settings"],
                          "cannot read config")
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{what} '{path}' must hold a mapping of sections (job:, cluster:, ...), not a {type(data).__name__}"],
            "cannot read config",
        )
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=value` strings to a nested dict. Scalars stay strings for pydantic to coerce against the
    field's type; `[...]`/`{...}` are parsed as YAML flow collections; `null` clears a field."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not key or not all(p.isidentifier() for p in parts):
            problems.append(
                f"override '{item}': expected section.field=value, e.g. optim.lr=1e-3 or cluster.nodes=2"
            )
            continue
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                problems.append(f"override '{item}': the value is not a valid YAML list or mapping")
                continue
        elif raw.strip() in ("null", "~"):
            value = None
        node = out
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                problems.append(f"override '{item}' conflicts with '{part}={existing}' given before it")
                break
            node = existing
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "invalid command-line overrides")
    return out


@functools.lru_cache(maxsize=32)
def _read_profile(path: Path, mtime_ns: int) -> dict[str, Any]:
    return read_yaml(path, what="cluster profile")


def read_profile(path: Path) -> dict[str, Any]:
    """A profile, parsed once per process (a sweep resolves hundreds of configs against one profile)."""
    return copy.deepcopy(_read_profile(path, path.stat().st_mtime_ns))


def find_profile(name: str) -> Path:
    """A profile name (`lumi`) or a path to a profile YAML file."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name).expanduser()
    return PROFILES_DIR / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _unwrap(annotation: Any) -> Any:
    """The type under `Annotated[...]` and `X | None`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_at(path: list[str]) -> Any:
    """The (unwrapped) type of the config value at `path`; None where no field is."""
    current: Any = AnvilConfig
    for part in path:
        origin = typing.get_origin(current)
        if _is_model(current):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = _unwrap(field.annotation)
        elif origin is dict:
            current = _unwrap(typing.get_args(current)[1])
        elif origin in (list, tuple) and part.isdigit():
            current = _unwrap(typing.get_args(current)[0])
        else:
            return None
    return current


def config_field(path: str) -> Any:
    """The type of the config field at a dotted path (`optim.lr` -> float), or None if there is none."""
    return _type_at(path.split(".")) if path else None


def _is_structured(annotation: Any) -> bool:
    return _is_model(annotation) or typing.get_origin(annotation) in (dict, list, tuple)


@dataclass
class EnvLayer:
    """The `ANVIL_*` config variables of one environment: parsed here and nowhere else."""

    data: dict[str, Any]
    """Their values as nested data (strings; JSON-decoded where the field holds a list, map or section)."""
    paths: dict[str, str]
    """Variable name -> the dotted field path it sets (to say where a bad value came from)."""
    problems: list[str]


def environment_layer(environ: Mapping[str, str]) -> EnvLayer:
    """`ANVIL_<SECTION>__<FIELD>[__...]=value` for every name but the tools' own (RUNTIME_ENV).

    Field names are matched without regard to case; keys of maps (`ANVIL_CLUSTER__ENV__NCCL_DEBUG`) keep theirs.
    """
    layer = EnvLayer({}, {}, [])
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in RUNTIME_ENV:
            continue
        parts, current = [], AnvilConfig
        for raw in name[len(ENV_PREFIX):].split("__"):
            part = raw.lower() if _is_model(current) or current is None else raw
            parts.append(part)
            current = _type_at(parts)
        if parts[0] not in SECTIONS:
            layer.problems.append(
                f"environment variable {name}: '{parts[0]}' is not a config section "
                f"(expected ANVIL_<SECTION>__<FIELD> with SECTION one of {', '.join(SECTIONS)}; "
                f"or one of {', '.join(sorted(RUNTIME_ENV))})"
            )
            continue
        value: Any = environ[name]
        if _is_structured(current):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                layer.problems.append(f"environment variable {name}: {'.'.join(parts)} takes a list or mapping "
                                      f"written as JSON (e.g. '{{\"KEY\": \"value\"}}'); {exc}")
                continue
        node = layer.data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                layer.problems.append(f"environment variable {name} conflicts with another ANVIL_* variable")
                break
        else:
            node[parts[-1]] = value
            layer.paths[name] = ".".join(parts)
    return layer


def _get(data: Any, path: list[str]) -> tuple[bool, Any]:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return False, None
    return True, data


def _keys_at(path: list[str]) -> list[str]:
    """The field names a model accepts at `path` (for 'unknown key' messages)."""
    model = _type_at(path)
    return list(model.model_fields) if _is_model(model) else []


@dataclass
class _Layers:
    """The sources of one load, in precedence order, to say where a bad value came from."""

    cli: dict
    env: EnvLayer
    yaml: dict
    yaml_name: str
    profile: dict
    profile_name: str

    def origin(self, path: list[str]) -> str:
        if _get(self.cli, path)[0]:
            return "from the command line"
        dotted = ".".join(path)
        for name, env_path in self.env.paths.items():
            if dotted == env_path or dotted.startswith(env_path + "."):
                return f"from environment variable {name}"
        if _get(self.yaml, path)[0]:
            return f"from {self.yaml_name}"
        if path[:1] == ["cluster"] and _get(self.profile, path[1:])[0]:
            return f"from cluster profile {self.profile_name}"
        return ""


def _describe(error: dict, layers: _Layers) -> str:
    loc = [str(p) for p in error["loc"] if p != "[key]"]
    path = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _keys_at(loc[:-1])
        hint = f" (valid keys here: {', '.join(valid)})" if valid else ""
        message = f"unknown key{hint}"
    elif kind == "missing":
        message = "required, but not given"
    elif kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        message = f"must be {PATTERN_HELP.get(pattern, f'a string matching {pattern}')}"
    else:
        message = error["msg"]
        if message.startswith("Value error, "):  # our own validators' words, kept as written
            message = message[len("Value error, "):]
        elif message:
            message = message[0].lower() + message[1:]
    value = ""
    if kind not in ("missing", "extra_forbidden") and not any(SECRET_NAME.search(p) for p in loc):
        shown = error.get("input")
        if not isinstance(shown, (dict, list)):
            text = repr(shown)
            value = f", got {text if len(text) <= 80 else text[:77] + '...'}"
    origin = layers.origin(loc)
    return f"{path}: {message}{value}" + (f" ({origin})" if origin else "")


def _merge(*layers: dict) -> dict:
    """Layers deep-merged, later ones winning: maps merge key by key, anything else is replaced."""
    out: dict = {}
    for layer in layers:
        _merge_into(out, layer)
    return out


def _merge_into(base: dict, layer: dict) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def load_config(config_file: Path | None, overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None,
                ) -> AnvilConfig:
    """Resolve every source into one validated config, or raise ConfigError listing each problem.

    The layers are merged as data, lowest first: model flavor < cluster profile < YAML file < environment <
    command line; then validated once. Nothing process-wide is read or changed but `environ` (default
    os.environ), which is only read.
    """
    cli = parse_overrides(list(overrides))
    yaml_data = read_yaml(config_file) if config_file is not None else {}
    yaml_name = str(config_file) if config_file is not None else "the config file"
    env = environment_layer(os.environ if environ is None else environ)
    upper = _merge(yaml_data, env.data, cli)  # the sources that choose the profile and the flavor

    problems = list(env.problems)
    _, chosen = _get(upper, ["cluster", "profile"])
    profile_name = str(chosen or "local")
    profile_path = find_profile(profile_name)
    if not profile_path.is_file():
        problems.append(
            f"cluster.profile: no profile '{profile_name}' (looked for {profile_path}); "
            f"available: {', '.join(available_profiles())}, or give a path to a profile YAML file"
        )
        profile: dict = {}
    else:
        profile = read_profile(profile_path)
        if "profile" in profile:
            problems.append(f"cluster profile {profile_path}: must not set 'profile' itself")
            profile.pop("profile")
    if problems:
        raise ConfigError(problems)

    _, flavor = _get(upper, ["model", "flavor"])
    flavor_layer = {"model": MODEL_FLAVORS[flavor]} if isinstance(flavor, str) and flavor in MODEL_FLAVORS else {}
    merged = _merge(flavor_layer, {"cluster": profile}, upper)
    try:
        return AnvilConfig.model_validate(merged)
    except ValidationError as exc:
        layers = _Layers(cli, env, yaml_data, yaml_name, profile, str(profile_path))
        raise ConfigError([_describe(e, layers) for e in exc.errors()]) from None


def as_submitted(cfg: AnvilConfig) -> AnvilConfig:
    """What depends on where submit.py runs, fixed in the frozen config: relative paths become absolute, and an
    unset `cluster.python` becomes the interpreter the job will run (a resubmission with `sbatch` runs the same)."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().absolute())

    data = cfg.data.model_copy(update={
        "datasets": [d.model_copy(update={"path": absolute(d.path)}) for d in cfg.data.datasets],
        "tokenizer": absolute(cfg.data.tokenizer) if cfg.data.tokenizer else None,
    })
    cluster = cfg.cluster
    update = {"venv": absolute(cluster.venv) if cluster.venv else None}
    if cluster.python is None and cluster.venv is None:
        update["python"] = cluster.interpreter
    if cluster.container is not None:
        update["container"] = cluster.container.model_copy(update={"image": absolute(cluster.container.image)})
    return cfg.model_copy(update={"data": data, "cluster": cluster.model_copy(update=update)})


def changed(cfg: AnvilConfig, changes: Mapping[str, Any]) -> AnvilConfig:
    """`cfg` with some dotted fields set (`{"parallel.tp": 2}`), validated again: how a planned alternative differs
    from the job it is planned for. Raises ConfigError naming the field if a value is not valid there."""
    data = cfg.model_dump()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    try:
        return AnvilConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
