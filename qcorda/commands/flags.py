"""CLI flags generated from the config dataclasses, so that each option is documented once.

:func:`add_config` adds one flag per field of a :mod:`qcorda.config` dataclass (nested ones
included): ``--rank``, ``--calib-samples``, ``--verify-data``; the help text is the field's docstring
(read from the source of :mod:`qcorda.config`, which holds every config) and its default.
:func:`build` makes the dataclass from the parsed arguments; a :class:`~qcorda.config.ConfigError`
it raises names the field, and is re-raised naming the flag. Torch-free.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass

from .. import config as cfgmod
from ..config import ConfigError


def add_recipe(parser: argparse.ArgumentParser, example: str) -> None:
    """The positional ``recipe`` (a file or a shipped recipe's name) and its ``KEY=VALUE`` overrides, as
    every verb that reads a recipe takes them; ``example``: overrides shown in the help."""
    parser.add_argument("recipe", help="a YAML recipe file, or a shipped recipe's name (`qcorda recipes` lists them)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides into the recipe, e.g. {example}")


@functools.cache
def docstrings() -> dict[str, dict[str, str]]:
    """class name → field → its docstring (one line), for every dataclass of :mod:`qcorda.config`."""
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(cfgmod)).body:
        if isinstance(node, ast.ClassDef):
            docs = {}
            for a, b in zip(node.body, node.body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                    docs[a.target.id] = " ".join(b.value.value.split())
            out[node.name] = docs
    return out


@dataclass(frozen=True)
class Flags:
    """One config class on a parser: its default instance and, per field path, the flag and the
    ``args`` attribute (``{"calib.samples": "--calib-samples"}``)."""

    cls: type
    default: object
    flags: dict[str, str]
    dests: dict[str, str]

    def flag(self, path: str) -> str:
        return self.flags.get(path, path)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _kind(hint) -> tuple[str, tuple]:
    """A field's type as the CLI sees it: (kind, literal options)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    literals = tuple(x for a in args if typing.get_origin(a) is typing.Literal for x in typing.get_args(a))
    if typing.get_origin(hint) is typing.Literal:
        return "str", typing.get_args(hint)
    if hint is bool:
        return "bool", ()
    if typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in args):
        inner = typing.get_args(hint if typing.get_origin(hint) is tuple else next(a for a in args if typing.get_origin(a) is tuple))
        return ("ints" if inner and inner[0] is int else "strs"), ()
    for t, name in ((int, "int"), (float, "float")):
        if hint is t or t in args:
            return name, literals
    return "str", literals


def add_config(parser: argparse.ArgumentParser, cls: type, *, default=None, prefixes: dict[str, str] | None = None,
               rename: dict[str, str] | None = None, skip: tuple[str, ...] = (), title: str | None = None, _path: str = "",
               _flags: Flags | None = None) -> Flags:
    """Add a flag for every field of ``cls`` (recursing into nested configs) to ``parser``.

    ``prefixes``: nested path → flag prefix (``{"calib.": "calib-"}``; default: the path itself);
    ``rename``: field path → flag, where the flag is not the field's name; ``skip``: paths the verb
    sets itself; ``default``: the instance whose values are the defaults (default ``cls()``)."""
    default = cls() if default is None else default
    prefixes, rename = prefixes or {}, rename or {}
    flags = _flags or Flags(cls, default, {}, {})
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    docs = docstrings().get(cls.__name__, {})
    for f in dataclasses.fields(cls):
        path = _path + f.name
        if path in skip:
            continue
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            add_config(parser, hints[f.name], default=value, prefixes=prefixes, rename=rename, skip=skip,
                       title=docs.get(f.name, f.name).rstrip("."), _path=path + ".", _flags=flags)
            continue
        flag = rename.get(path) or "--" + prefixes.get(_path, _path.replace(".", "-")) + f.name.replace("_", "-")
        dest = path.replace(".", "__")
        flags.flags[path], flags.dests[path] = flag, dest
        kind, options = _kind(hints[f.name])
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        helptext = docs.get(f.name, "") + (f" (default {shown})" if shown not in (None, "", ()) and kind != "bool" else "")
        if kind == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=value, help=helptext)
        else:
            conv = {"int": int if not options else str, "float": float if not options else str, "strs": _csv, "ints": _csv}.get(kind, str)
            group.add_argument(flag, dest=dest, type=conv, default=value, help=helptext.replace("%", "%%"),
                               metavar=f"{{{','.join(map(str, options))}}}" if options and kind == "str" else f.name.upper())
    return flags


def _value(hint, value, path: str, flags: Flags):
    """A parsed argument as the field's type: comma-separated integers, a number or a literal."""
    kind, options = _kind(hint)
    if value is None or not isinstance(value, (str, tuple)):
        return value
    try:
        if kind == "ints":
            return tuple(int(v) for v in value)
        if kind in ("int", "float") and isinstance(value, str) and value not in options:
            return int(value) if kind == "int" else float(value)
    except ValueError:
        what = "comma-separated integers" if kind == "ints" else f"a{'n integer' if kind == 'int' else ' number'}"
        shown = ",".join(value) if isinstance(value, tuple) else value
        raise ConfigError(f"must be {what}{' or ' + ' or '.join(options) if options else ''}, got {shown!r}", flags.flag(path)) from None
    return value


def build(args: argparse.Namespace, flags: Flags, _cls: type | None = None, _path: str = "", **given):
    """The config of ``flags`` from the parsed ``args`` (``given``: values of skipped fields); an error
    names the flag of the field at fault."""
    cls = _cls or flags.cls
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = _path + f.name
        if path in flags.dests:
            kwargs[f.name] = _value(hints[f.name], getattr(args, flags.dests[path]), path, flags)
        elif dataclasses.is_dataclass(hints[f.name]) and any(p.startswith(path + ".") for p in flags.dests):
            kwargs[f.name] = build(args, flags, hints[f.name], path + ".", **given.get(f.name, {}))
        elif f.name in given:
            kwargs[f.name] = given[f.name]
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.field is None:
            raise
        raise e.renamed(flags.flag(_path + e.field)) from None
