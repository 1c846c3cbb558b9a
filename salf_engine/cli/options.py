"""Command-line options generated from `TrainConfig`, and ``--config FILE`` (YAML or JSON).

Each option is one field of :class:`~salf_engine.config.TrainConfig`: its name (``--field-name``, or the
``flag`` of the field's metadata), type, choices (``Literal`` fields), default and help (the metadata's
``help``) come from the field, so a new field becomes an option of ``salf train`` by itself. A command
that reads only some fields names them; a command may give a field another spelling too (``salf eval
--split`` for ``eval_split``) or another default (``salf eval`` takes its dataset from the run directory
unless ``--dataset`` is given).

``--config FILE``: the file's values replace the defaults, the options given on the command line replace
the file's values. A run directory's ``config.json`` is such a file, so ``salf train --config
RUN/config.json`` resolves to the config the run was made with.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

from salf_engine.config import TrainConfig, field_types, load_config_file
from salf_engine.errors import ConfigError

__all__ = ["add_config_options", "add_config_file_option", "apply_config_file", "check_required",
           "config_fields", "field_option", "fields_from_args"]


def config_fields() -> dict[str, dataclasses.Field]:
    """TrainConfig field name -> field, in declaration order."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def field_option(name: str) -> dict[str, Any]:
    """How a field becomes an option: ``kind`` (bool / list / scalar), ``type``, ``choices``, ``optional``."""
    tp = field_types()[name]
    args = get_args(tp)
    optional = type(None) in args
    inner = next(a for a in args if a is not type(None)) if optional else tp
    if inner is bool:
        return {"kind": "bool", "type": bool, "choices": None, "optional": optional}
    if typing.get_origin(inner) is list:
        return {"kind": "list", "type": get_args(inner)[0], "choices": None, "optional": optional}
    if typing.get_origin(inner) is Literal:
        return {"kind": "scalar", "type": str, "choices": get_args(inner), "optional": optional}
    return {"kind": "scalar", "type": inner, "choices": None, "optional": optional}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def _states_default(help_text: str, default: Any) -> bool:
    """Whether a field's help already says what its default does (``default: ...``, or ``none: ...`` for an
    unset option), so that ``--help`` does not show a second, generated default."""
    text = help_text.lower()
    return "default" in text or (default is None and "(none:" in text)


def add_config_options(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    *,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, Iterable[str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    required: Iterable[str] = (),
    title: str = "training options (TrainConfig fields)",
) -> list[str]:
    """Add an option per TrainConfig field (all of them, or ``names``, minus ``exclude``); returns the names.

    The option's dest is the field name. ``aliases``: more spellings of a field's option; ``defaults``:
    another default for this command; ``required``: fields that must be given (on the command line or
    by ``--config``; checked by :func:`check_required`, so that a config file can supply them).
    """
    fields = config_fields()
    chosen = [n for n in (list(names) if names is not None else fields) if n not in set(exclude)]
    unknown = [n for n in chosen if n not in fields]
    if unknown:
        raise ValueError(f"not TrainConfig fields: {', '.join(unknown)}")
    aliases = aliases or {}
    defaults = defaults or {}
    required = set(required)
    group = parser.add_argument_group(title)
    for name in chosen:
        f = fields[name]
        spec = field_option(name)
        default = None if name in required else defaults.get(name, _default(f))
        flags = [f.metadata.get("flag") or "--" + name.replace("_", "-"), *aliases.get(name, ())]
        help_text = f.metadata.get("help", "")
        if spec["kind"] == "bool":
            negated = bool(default)
            if negated:
                help_text = f"do not {help_text}" if help_text else "turn off"
            group.add_argument(*flags, dest=name, action="store_false" if negated else "store_true",
                               default=default, help=help_text)
            continue
        if name in required:
            help_text = f"{help_text} (required)"
        elif not _states_default(help_text, default):
            help_text = f"{help_text} (default: {_show(default)})"
        kwargs: dict[str, Any] = dict(dest=name, default=default, type=spec["type"], help=help_text)
        if spec["choices"] is not None:
            kwargs["choices"] = spec["choices"]
        if spec["kind"] == "list":
            kwargs["nargs"] = "+"
            kwargs["metavar"] = name.upper().removesuffix("S")
        group.add_argument(*flags, **kwargs)
    parser.set_defaults(_salf_required=sorted(required | set(parser.get_default("_salf_required") or ())),
                        _salf_fields=[*(parser.get_default("_salf_fields") or ()), *chosen])
    return chosen


def add_config_file_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: option values from a YAML or JSON file (the command line overrides them)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of option values (field names as keys, e.g. a run's "
                             "config.json); options given on the command line override them")


def _coerce(name: str, value: Any) -> Any:
    """A config-file value in the field's type where that is unambiguous (YAML reads ``1e-4`` as text)."""
    spec = field_option(name)
    if value is None or spec["kind"] != "scalar" or spec["choices"] is not None:
        return value
    if spec["type"] in (int, float) and isinstance(value, str):
        try:
            return spec["type"](value)
        except ValueError:
            return value  # validate() names the field
    if spec["type"] is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_config_file(parser: argparse.ArgumentParser, path: str, *, command: str) -> None:
    """Make the values of the config file at ``path`` the defaults of ``parser`` (one subcommand).

    A key sets the option of this command with that name (its dest). Other TrainConfig fields are skipped
    with a one-line note on stderr (``salf compare`` sets ``dataset`` per cell, ``salf eval`` trains
    nothing); any other key is a ConfigError.
    """
    values = load_config_file(path)
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}
    fields = config_fields()
    unknown = sorted(k for k in values if k not in fields and k not in dests)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) for salf {command}: {', '.join(unknown)}")
    skipped = sorted(k for k in values if k not in dests)
    if skipped:
        print(f"salf {command}: {path}: not used by this command: {', '.join(skipped)}", file=sys.stderr)
    parser.set_defaults(**{k: (_coerce(k, v) if k in fields else v) for k, v in values.items() if k in dests})


def check_required(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with the usual one-line argument error when a required field was given nowhere."""
    missing = [n for n in getattr(args, "_salf_required", ()) or () if getattr(args, n, None) is None]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        parser.error(f"the following arguments are required: {flags} (on the command line or in --config)")


def fields_from_args(args: argparse.Namespace, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The TrainConfig fields this command's parser generated, with their parsed values."""
    skip = set(exclude)
    return {n: getattr(args, n) for n in getattr(args, "_salf_fields", ()) or () if n not in skip}
