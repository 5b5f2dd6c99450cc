"""`contrib/kithmail.toml.example`: every key of the config, at its default, with its meaning.

Made from the pydantic models in `kithmail.config`, as `config.reference()`
makes docs/config.md, so neither can fall behind the code: a test compares
the file in the tree with `example()`, and loads it to check that it
means exactly the embedded defaults. A key whose default is "unset" is
written commented out (TOML has no null). Regenerate with
`.venv/bin/python -m kithmail.config_example > contrib/kithmail.toml.example`.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kithmail import config

__all__ = ["example", "toml_value"]

_HEADER = """\
# kithmail.toml — every key, at its default.
#
# Generated from python/kithmail/config.py (python -m kithmail.config_example);
# a test keeps the two equal. Every key is optional: delete what you do not
# change. The reference with the same words is docs/config.md.
#
# Durations: "250ms", "60s", "5m", "24h", "30d", "1w" or seconds (written
# here in seconds). Sizes: "25MiB", "512KiB", "10MB" or bytes (written here
# in bytes). Actions: accept, tag, quarantine, defer, reject. Every layer has
# mode = "enforce" | "shadow". Check a file with: kith check-config -c FILE
# SIGHUP re-reads it; listeners and data_dir need a restart.
"""


def toml_value(v: Any) -> str:
    """`v` as a TOML value (strings as basic strings, tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v), ensure_ascii=False)
    if isinstance(v, BaseModel):
        return toml_value(v.model_dump(mode="python", by_alias=True, exclude_none=True))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def _default(f: Any) -> Any:
    if f.default_factory is not None:
        return f.default_factory()
    return None if f.default is PydanticUndefined else f.default


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 76)] if text else []


def _section(title: str, model: type[BaseModel], out: list[str]) -> None:
    out += ["", f"[{title}]"]
    doc = (model.__doc__ or "").strip()
    if doc and not doc.startswith(model.__name__ + "("):
        out += _comment(doc.splitlines()[0])
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        key = f.alias or name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((f"{title}.{key}", ann))
            continue
        value = _default(f)
        out += _comment(f.description or "")
        if value is None:
            out.append(f"# {key} =   (unset)")
        else:
            out.append(f"{key} = {toml_value(value)}")
    for t, m in nested:
        _section(t, m, out)


def example() -> str:
    """The whole example file."""
    out = [_HEADER.rstrip("\n")]
    for name, f in config.Settings.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _section(name, ann, out)
    out += [
        "",
        "# Local allow and block lists loaded into the core at start and on",
        "# SIGHUP; one table per list (none by default):",
        "#",
        "# [[reputation.local_lists]]",
    ]
    for name, f in config.LocalList.model_fields.items():
        value = _default(f)
        shown = "(required)" if value is None else toml_value(value)
        desc = f" — {f.description}" if f.description else ""
        out.append(f"# {name} = {shown}{desc}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(example(), end="")
