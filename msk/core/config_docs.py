"""Every config key of every command, generated from the pydantic models (``docs/config.md``).

The commands and their configs are found in :mod:`msk.core.cli` itself: each command function
that calls ``load_config(SomeConfig, ...)`` documents ``SomeConfig`` (a new command is listed
without anyone remembering to); configs a command reads elsewhere (``msk serve``) or picks at
run time (``msk tune``'s task config) are named in :data:`EXTRA`. Each config becomes a table of
key, type, default and description, nested models expanded with dotted keys
(``augmentation.rotation.p``; ``classifiers[].name`` for a list of models). Defaults are those
of a config built with no options, so nested defaults are the ones the command really uses.

Regenerate after changing a config::

    python -m msk.core.config_docs > docs/config.md

``tests/test_config_docs.py`` fails when the committed file differs from :func:`render`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["EXTRA", "CommandConfigs", "Row", "command_configs", "config_rows", "render"]

CLI = Path(__file__).with_name("cli.py")

#: Configs a command reads without a ``load_config`` call in its own body: command -> (note, configs).
EXTRA: dict[str, tuple[str, tuple[str, ...]]] = {
    "msk serve": ("CONFIG (the YAML argument) holds these keys; relative paths are read from its folder.",
                  ("msk.serve.config:ServeConfig",)),
    "msk tune": ("`--config` takes the config of TASK: the keys of `msk train sorter` (sorter), "
                 "`msk eval fusion` (fusion) or `msk eval recommender` (recommender); the search space "
                 "YAML names some of those keys.", ()),
}


@dataclass
class CommandConfigs:
    """A command (``msk train sorter``) and the config classes it reads."""

    command: str
    configs: list[type[BaseModel]] = field(default_factory=list)
    has_config_file: bool = False
    note: str = ""


@dataclass(frozen=True)
class Row:
    """One documented key."""

    key: str
    type: str
    default: str
    description: str


# -- which command reads which config ------------------------------------------------------------


def _imports(body: list[ast.stmt] | ast.Module) -> dict[str, str]:
    """name -> module of the ``from X import name`` statements in ``body`` (not nested functions)."""
    nodes = body.body if isinstance(body, ast.Module) else body
    found: dict[str, str] = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                found[alias.asname or alias.name] = node.module
    return found


def _command_name(func: ast.FunctionDef, groups: dict[str, str]) -> str | None:
    """``msk [group] name`` of a typer command function, or ``None`` for other functions."""
    for deco in func.decorator_list:
        if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "command" and isinstance(deco.func.value, ast.Name)):
            continue
        typer_app = deco.func.value.id
        if typer_app != "app" and typer_app not in groups:
            continue
        name = (str(deco.args[0].value) if deco.args and isinstance(deco.args[0], ast.Constant)
                else func.name.replace("_", "-"))
        return " ".join(["msk", *([groups[typer_app]] if typer_app != "app" else []), name])
    return None


def _typer_groups(tree: ast.Module) -> dict[str, str]:
    """typer app variable -> its sub-command name (``app.add_typer(train_app, name="train")``)."""
    groups: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_typer"
                and node.args and isinstance(node.args[0], ast.Name)):
            for kw in node.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    groups[node.args[0].id] = str(kw.value.value)
    return groups


def _load(module: str, name: str) -> type[BaseModel]:
    return getattr(importlib.import_module(module), name)


def command_configs(cli: Path | None = None) -> list[CommandConfigs]:
    """Every command of ``cli`` (default: :mod:`msk.core.cli`'s source) that reads a config, in source
    order, with the config classes it reads (``load_config(Class, ...)`` in its body, plus
    :data:`EXTRA`)."""
    tree = ast.parse(Path(cli if cli is not None else CLI).read_text())
    groups = _typer_groups(tree)
    module_imports = _imports(tree)
    found: list[CommandConfigs] = []
    for func in tree.body:
        if not isinstance(func, ast.FunctionDef) or (command := _command_name(func, groups)) is None:
            continue
        local = {**module_imports, **_imports(func.body)}
        entry = CommandConfigs(command, has_config_file=any(a.arg == "config" for a in func.args.args))
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "load_config"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in local):
                cls = _load(local[node.args[0].id], node.args[0].id)
                if cls not in entry.configs:
                    entry.configs.append(cls)
        if command in EXTRA:
            entry.note, extra = EXTRA[command]
            for ref in extra:
                cls = _load(*ref.split(":"))
                if cls not in entry.configs:
                    entry.configs.append(cls)
        if entry.configs or entry.note:
            found.append(entry)
    return found


# -- one config as rows -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """A short, readable name of a field's type: ``int``, ``str | None``, ``"none" | "median_frequency"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if inspect.isclass(tp):
        return {"Path": "path", "PurePath": "path"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _bounds(info: FieldInfo) -> str:
    """The numeric and length bounds of a field: ``>= 1``, ``0..1``, ``length >= 1``."""
    marks = {type(m).__name__: m for m in info.metadata}
    parts = []
    low = ("ge", ">=") if "Ge" in marks else ("gt", ">") if "Gt" in marks else None
    high = ("le", "<=") if "Le" in marks else ("lt", "<") if "Lt" in marks else None
    if low:
        parts.append(f"{low[1]} {getattr(marks[low[0].capitalize()], low[0])}")
    if high:
        parts.append(f"{high[1]} {getattr(marks[high[0].capitalize()], high[0])}")
    if "MinLen" in marks:
        parts.append(f"length >= {marks['MinLen'].min_length}")
    return ", ".join(parts)


def _models_in(tp: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model class inside ``tp`` (``Model``, ``Model | None``, ``list[Model]``) and whether
    it is a list of them; ``(None, False)`` for other types."""
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return tp, False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        models = [m for a in args if a is not type(None) for m in [_models_in(a)] if m[0] is not None]
        return models[0] if len(models) == 1 else (None, False)
    if origin in (list, tuple) and len(args) == 1:
        inner, _ = _models_in(args[0])
        return inner, inner is not None
    return None, False


def _value(value: Any) -> str:
    """A default as it would be written in YAML (JSON syntax: ``null``, ``true``, ``[0.4, 1.0]``)."""
    from pydantic import TypeAdapter

    try:
        return json.dumps(TypeAdapter(Any).dump_python(value, mode="json"))
    except Exception:  # noqa: BLE001 - anything not JSON-able is shown as Python writes it
        return repr(value)


def _default_of(cls: type[BaseModel]) -> BaseModel | None:
    """``cls()`` with every default, or ``None`` when it needs values (a required field)."""
    try:
        return cls()
    except (ValidationError, TypeError):
        return None


def _param_doc(owner: type[BaseModel], name: str) -> str:
    """The ``:param name:`` text of ``owner``'s docstring (or a base class's), else ``""``."""
    for cls in owner.__mro__:
        doc = inspect.getdoc(cls) if "__doc__" in vars(cls) else None
        match = re.search(rf"^:param {re.escape(name)}:(.*(?:\n[ \t]+.*)*)", doc or "", re.MULTILINE)
        if match:
            return match.group(1)
    return ""


def _description(owner: type[BaseModel], name: str, info: FieldInfo, model: type[BaseModel] | None) -> str:
    """The field's ``description``; else its ``:param:`` in the class docstring; else, for a nested
    model, the first paragraph of that model's docstring."""
    text = (info.description or "").strip() or _param_doc(owner, name).strip()
    if not text and model is not None:
        text = (inspect.getdoc(model) or "").split("\n\n")[0]
    return " ".join(text.split())


def _factory_text(info: FieldInfo) -> str | None:
    """A default made by a named function (``working_syntaxes``) depends on where msk runs: the
    docs name the function and what its docstring says, not the value it gave here."""
    factory = info.default_factory
    if factory is None or inspect.isclass(factory) or getattr(factory, "__name__", "<lambda>") == "<lambda>":
        return None
    doc = (inspect.getdoc(factory) or "").split("\n\n")[0]
    return f"{factory.__name__}(): {' '.join(doc.split())}".rstrip(": ")


def config_rows(cls: type[BaseModel], prefix: str = "", instance: BaseModel | None = None,
                _depth: int = 0) -> list[Row]:
    """The documented keys of ``cls``, nested models expanded (``prefix`` + dotted keys).

    :param instance: where defaults are read (default: ``cls()`` when it needs no values, else
        each field's own default).
    """
    if instance is None:
        instance = _default_of(cls)
    rows: list[Row] = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        model, is_list = _models_in(info.annotation)
        bounds = _bounds(info)
        type_text = _type_name(info.annotation) + (f" ({bounds})" if bounds else "")
        if info.is_required():
            default = "required"
            value = None
        else:
            value = (getattr(instance, name) if instance is not None
                     else info.get_default(call_default_factory=True))
            default = "see below" if isinstance(value, BaseModel) else (_factory_text(info) or _value(value))
        rows.append(Row(key, type_text, default, _description(cls, name, info, model)))
        if model is not None and _depth < 6:
            inner = value if isinstance(value, model) else None
            rows.extend(config_rows(model, f"{key}[]." if is_list else f"{key}.", inner, _depth + 1))
    return rows


# -- Markdown ------------------------------------------------------------------------------------


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ``:class:`~a.B``` -> `` `B` ``, double backquotes -> single."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`.]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


def _anchor(command: str) -> str:
    return command.lower().replace(" ", "-")


def render() -> str:
    """``docs/config.md``: every command's config keys as Markdown tables."""
    commands = command_configs()
    lines = [
        "# Config keys of every command",
        "",
        "Generated from the pydantic models by `python -m msk.core.config_docs > docs/config.md`; do not "
        "edit by hand (`tests/test_config_docs.py` fails when this file is stale).",
        "",
        "A command with `--config FILE` reads these keys from a YAML file (relative paths in it are read "
        "from the file's folder); its command-line options override the file. Unknown keys are errors. "
        "Nested keys are written nested in YAML: `augmentation.rotation.p: 0.5` is",
        "",
        "```yaml",
        "augmentation:",
        "  rotation:",
        "    p: 0.5",
        "```",
        "",
        "`classifiers[].name` is the `name` of each item of the list `classifiers`. Defaults are JSON "
        "(`null`, `true`, `[0.4, 1.0]`); \"see below\" marks a nested section, \"required\" a key without "
        "a default. They are the models' own: a command with `--profile` fills the sizes and epochs you "
        "leave unset from the machine's profile instead (docs/profiles.md), and says so when it starts.",
        "",
    ]
    lines += [f"- [{c.command}](#{_anchor(c.command)})" for c in commands]
    documented: dict[type[BaseModel], str] = {}
    for entry in commands:
        lines += ["", f"## {entry.command}", ""]
        if entry.note:
            lines += [entry.note, ""]
        elif entry.has_config_file:
            lines += ["`--config FILE` holds these keys.", ""]
        else:
            lines += ["No config file: these are the keys behind its command-line options.", ""]
        for cls in entry.configs:
            if cls in documented:
                lines += [f"`{cls.__name__}`: the keys of [{documented[cls]}](#{_anchor(documented[cls])}).", ""]
                continue
            documented[cls] = entry.command
            doc = _markdown((inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " "))
            lines += [f"### {cls.__name__}", "", doc, "", "| key | type | default | description |",
                      "|---|---|---|---|"]
            lines += [f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |"
                      for r in config_rows(cls)]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
