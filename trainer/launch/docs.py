"""Generate the README's configuration reference from the pydantic tree, so it cannot drift.

`python -m trainer.launch.docs` prints it; `python -m trainer.launch.docs --write README.md` replaces the
marked region in the README; a test fails when the README is stale.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from trainer.core.config import AnvilConfig

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _type_name(annotation: object) -> str:
    """Readable type: `int`, `str | None`, `'cpu' | 'cuda'`, `dict[str, str]`, `list[DatasetSpec]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation: object, path: str) -> tuple[str, type[BaseModel]] | None:
    """A model held by this field (directly, optionally, or as dict values / list items) and its path."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return path, annotation
    if origin is typing.Annotated:
        return _nested(args[0], path)
    if origin in (typing.Union, types.UnionType):
        return next((n for a in args if (n := _nested(a, path))), None)
    if origin is dict:
        return _nested(args[1], f"{path}.<name>")
    if origin is list:
        return _nested(args[0], f"{path}[i]")
    return None


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _nested(field.annotation, path)
        if sub is not None and sub[0] == path and isinstance(field.default, BaseModel):
            nested.append(sub)  # a sub-section with its own defaults: list its fields instead
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{path}` | {_type_name(field.annotation)} | `{default}` | {doc} |")
        if sub is not None:
            nested.append(sub)
    for path, sub_model in nested:
        rows += _rows(sub_model, f"{path}.")
    return rows


def reference() -> str:
    parts = [START]
    for section, field in AnvilConfig.model_fields.items():
        parts.append(f"\n#### `{section}`: {field.description}\n")
        parts.append("| field | type | default | meaning |\n|---|---|---|---|")
        parts += _rows(typing.cast(type[BaseModel], field.annotation), f"{section}.")
    parts.append(END)
    return "\n".join(parts)


def write(readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(head + reference() + tail, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write(Path(sys.argv[2]))
    else:
        print(reference())
