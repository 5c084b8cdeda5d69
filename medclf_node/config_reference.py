"""Render the configuration reference (README.md) from the config models themselves.

Generated, never typed by hand: a test checks that README.md contains the current output.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from medclf_node.config import Config

_SECTIONS_AS_TABLES = {"peers": "[[peers]]", "folders": "[[folders]]", "rules": "[[rules]]"}


def _default_text(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        return "(required)"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, (str, Path)):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "(unset)"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]"
    return str(value)


def render_reference() -> str:
    """Markdown: one table per section, key | default | meaning."""
    out: list[str] = []
    for section_name, info in Config.model_fields.items():
        annotation = info.annotation
        args = getattr(annotation, "__args__", None)
        model = args[0] if args else annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        header = _SECTIONS_AS_TABLES.get(section_name, f"[{section_name}]")
        out.append(f"#### `{header}`\n")
        if model.__doc__ and section_name in _SECTIONS_AS_TABLES:
            out.append(model.__doc__.strip().splitlines()[0] + "\n")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for key, field in model.model_fields.items():
            default = _default_text(model, key)
            if key == "directory" and section_name == "models":
                default = "the repository's `models/`"
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{key}` | `{default}` | {desc} |")
        out.append("")
    return "\n".join(out)


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_readme(text: str) -> str:
    """Replace the block between the reference markers with the current reference."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render_reference()}\n{END}{tail}"


if __name__ == "__main__":  # pragma: no cover - developer helper: rewrites README.md in place
    from medclf_node.config import REPO_ROOT

    readme = REPO_ROOT / "README.md"
    readme.write_text(update_readme(readme.read_text(encoding="utf-8")), encoding="utf-8")
