"""Where a config comes from: defaults < cluster profile < YAML file < `ANVIL_*` environment < CLI.

The layering itself is pydantic-settings' (deep-merged sources); this module reads the YAML file and
the profile, parses `a.b=value` overrides, and turns every failure into one readable line per
problem that names the field, the offending value and which source it came from.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config import (
    ENV_NAME,
    LOWER_LAYERS,
    MODEL_FLAVORS,
    NAME_PATTERN,
    SBATCH_WORD,
    SECRET_NAME,
    SECTIONS,
    AnvilConfig,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "templates" / "clusters"
ENV_PREFIX = "ANVIL_"
RUNTIME_ENV = frozenset({"ANVIL_EXECUTOR", "ANVIL_JOBS_DIR", "ANVIL_SLURM_NODES", "ANVIL_REQUIRE_SLURM"})
"""`ANVIL_*` variables that steer the tools rather than the config; every other one must name a field."""

PATTERN_HELP = {
    NAME_PATTERN: "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 100 characters",
    SBATCH_WORD: "a plain word for an #SBATCH line (letters, digits and _@%+=:,./[]- only; no spaces or quotes)",
    ENV_NAME: "a shell variable name (letters, digits and '_', not starting with a digit)",
    r"^[a-z][a-z-]*$": "an sbatch long option name such as 'constraint' or 'reservation'",
    r"^\d+[KMGT]?$": "a memory size such as 0, 4000, 64G or 480G",
}


class ConfigError(Exception):
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
        return {}
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


def _env_layer(environ: Mapping[str, str]) -> dict[str, str]:
    """`ANVIL_*` config variables and the dotted field path each one sets (for checks and messages)."""
    out = {}
    for name in environ:
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in RUNTIME_ENV:
            out[name] = ".".join(name[len(ENV_PREFIX):].lower().split("__"))
    return out


def _check_env_names(environ: Mapping[str, str]) -> list[str]:
    """pydantic-settings silently ignores `ANVIL_FOO` when `foo` is no section; a typo should fail."""
    problems = []
    for name, path in sorted(_env_layer(environ).items()):
        section = path.split(".")[0]
        if section not in SECTIONS:
            problems.append(
                f"environment variable {name}: '{section}' is not a config section "
                f"(expected ANVIL_<SECTION>__<FIELD> with SECTION one of {', '.join(SECTIONS)}; "
                f"or one of {', '.join(sorted(RUNTIME_ENV))})"
            )
    return problems


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
    model: Any = AnvilConfig
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((c for c in candidates if issubclass(c, BaseModel)), None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


class _Layers:
    """The sources of one load, in precedence order, to say where a bad value came from."""

    def __init__(self, cli: dict, environ: Mapping[str, str], yaml_data: dict, yaml_name: str,
                 profile: dict, profile_name: str):
        self.cli, self.environ, self.yaml, self.profile = cli, environ, yaml_data, profile
        self.yaml_name, self.profile_name = yaml_name, profile_name
        self.env_paths = _env_layer(environ)

    def origin(self, path: list[str]) -> str:
        if _get(self.cli, path)[0]:
            return "from the command line"
        dotted = ".".join(path)
        for name, env_path in self.env_paths.items():
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


def _flavor(cli: dict, environ: Mapping[str, str], yaml_data: dict) -> object:
    """The model flavor named by the highest source that names one."""
    found, value = _get(cli, ["model", "flavor"])
    if found:
        return value
    env = next((v for k, v in environ.items() if k.upper() == "ANVIL_MODEL__FLAVOR"), None)
    if env is not None:
        return env
    return _get(yaml_data, ["model", "flavor"])[1]


def load_config(config_file: Path | None, overrides: list[str] = (), environ: Mapping[str, str] | None = None,
                ) -> AnvilConfig:
    """Resolve every source into one validated config, or raise ConfigError listing each problem."""
    environ = os.environ if environ is None else environ
    cli = parse_overrides(list(overrides))
    yaml_data = read_yaml(config_file) if config_file is not None else {}
    yaml_name = str(config_file) if config_file is not None else "the config file"

    problems = _check_env_names(environ)
    env_profile = next((v for k, v in environ.items() if k.upper() == "ANVIL_CLUSTER__PROFILE"), None)
    found, cli_profile = _get(cli, ["cluster", "profile"])
    _, yaml_profile = _get(yaml_data, ["cluster", "profile"])
    profile_name = str(cli_profile if found else env_profile or yaml_profile or "local")
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

    layers = _Layers(cli, environ, yaml_data, yaml_name, profile, str(profile_path))
    token = LOWER_LAYERS.set((yaml_data, profile, MODEL_FLAVORS.get(_flavor(cli, environ, yaml_data), {})))
    saved_environ = None
    if environ is not os.environ:  # pydantic-settings reads os.environ; swap it for the duration
        saved_environ = dict(os.environ)
        os.environ.clear()
        os.environ.update(environ)
    try:
        cfg = AnvilConfig(**cli)
    except ValidationError as exc:
        raise ConfigError([_describe(e, layers) for e in exc.errors()]) from None
    except Exception as exc:  # pydantic-settings raises SettingsError for malformed env JSON
        raise ConfigError([f"environment: {exc}"]) from None
    finally:
        LOWER_LAYERS.reset(token)
        if saved_environ is not None:
            os.environ.clear()
            os.environ.update(saved_environ)
    return cfg
