r"""Configs: dataclasses whose fields are the options of a command, parsed by ``transformers.HfArgumentParser``.

Every field carries its one-line help, and optionally its allowed values, next to it::

    beta: float = field(default=0.1, metadata={"help": "inverse temperature", "check": "> 0"})
    loss_type: str = field(default="sigmoid", metadata={"help": "the loss", "choices": ("sigmoid", "ipo")})

``choices`` is a tuple of names or a zero-argument callable returning them (a registry's ``names``);
``check`` is a bound on a number (``"> 0"``, ``">= 1"``, ``"<= 1"``) or an interval (``"[0, 1)"``); on a list
field both apply to every item, and ``None`` (of an optional field) passes. A number must be finite on every
field: NaN is always rejected, and an infinity only where the field's metadata says ``"allow_inf": True``
(then ``check`` still applies to it, so ``"> 0"`` admits ``inf`` but not ``-inf``). :class:`Config` checks them in
``__post_init__``, so a config built in Python is validated exactly like one from the command line, before
anything is loaded.

``path`` says that a string field names something on disk, one of :data:`otalign.paths.PATH_KINDS`
(:mod:`otalign.paths` states what each requires); ``builtins`` lists the names its loader takes instead of a path
(``("builtin", "arithmetic")`` for a prompt set)::

    prompts: str = field(default="builtin", metadata={"help": "...", "path": "file", "builtins": PROMPT_SETS})

Paths are checked by :meth:`Config.validate`, not in ``__post_init__``: a config may name a file that does not
exist yet when it is built, e.g. the pipeline's later stages read the model and the data its earlier stages write,
and the sweep builds every cell's config ahead. The CLI validates every command's config right after parsing, and
every trainer its config before it loads anything; the pipeline validates all its stages before the first runs
(:meth:`otalign.pipeline.PipelineConfig.validate`).

``section`` (``"module:Class"``) marks a ``dict`` field that holds the overrides of another config (the
pipeline's stages): the command line reaches its fields as ``--<field>.<name>``.

:func:`parse_config` reads ``--config file.yaml`` and then the command line, so

    otalign ppo --config ppo.yaml --learning_rate 3e-6 --report_to tensorboard,wandb

sets exactly the fields named. Unknown keys (with a did-you-mean), values of the wrong type and invalid values are
reported with the file or option they came from.

Why ``HfArgumentParser``: it is what TRL's ``TrlParser`` builds on, so ``--help``, bare ``--flag`` /
``--no_flag`` booleans and ``--key v1 v2`` lists behave as a TRL user expects, and it is already a
dependency (transformers). ``jsonargparse`` was tried too: it nests dataclasses natively (``--ppo.max_steps``),
but needs ``--resume true`` instead of a bare ``--resume``, reads help from docstrings rather than the field,
has no did-you-mean, and cannot tell a field set by the user from its default, which the pipeline needs to link its
stages. The pipeline's ``--<section>.<field>`` options are built here from the section class's fields instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from otalign.paths import (  # noqa: F401
    DATA_SUFFIXES,
    DEFAULT_MODEL,
    PATH_KINDS,
    hub_problem,
    looks_like_path,
    path_problem,
)
from otalign.registry import resolve

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
NONE = ("none", "null", "~")
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
"""Weights dtypes a ``model_dtype`` field accepts (:func:`otalign.models.torch_dtype`)."""
MIXED_PRECISION = ("no", "fp16", "bf16")
"""accelerate autocast modes a ``mixed_precision`` field accepts."""
OWN_METADATA = ("check", "choices", "section", "allow_inf", "path", "builtins")
"""Field metadata keys read by otalign (the rest, e.g. ``help``, ``aliases``, goes to ``argparse``)."""


class ConfigError(ValueError):
    """A config file, option or value that does not fit the config dataclass.

    Args:
        message: what is wrong, naming the field.
        field: the offending field, when one is to blame (lets the parser name the file or option it came from).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def field_types(cls: type) -> dict[str, object]:
    """Resolved type annotation of every init field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def coerce(value: object, annotation: object, where: str) -> object:
    """``value`` (from YAML, or a command-line string) converted to ``annotation``; ``ConfigError`` if it does not fit.

    Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``list[X]``, ``dict``.
    Strings from the command line are parsed: ``true/false``, numbers, ``none``, comma-separated lists.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in NONE)
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is list:
        items = [v for v in value.split(",") if v] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(item, args[0] if args else str, f"{where}[{i}]") for i, item in enumerate(items)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (annotation is float or type(value) is int)
        ):
            return annotation(value)
        if isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected {'an integer' if annotation is int else 'a number'}, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            with contextlib.suppress(yaml.YAMLError):
                value = yaml.safe_load(value)
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def check_keys(keys: list[str], types_: dict[str, object], where: str) -> None:
    """``ConfigError`` naming the first key not in ``types_``, with the closest field names."""
    for key in keys:
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint}")


_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*(-?[\d.e+-]+)\s*$")
_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])\s*$")


def check_passes(rule: str, value: float) -> bool:
    """Whether the number ``value`` satisfies ``rule`` (``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ...); NaN never does."""
    if m := _BOUND.match(rule):
        op, bound = m.group(1), float(m.group(2))
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    if m := _INTERVAL.match(rule):
        lo, hi = float(m.group(2)), float(m.group(3))
        above = value >= lo if m.group(1) == "[" else value > lo
        below = value <= hi if m.group(4) == "]" else value < hi
        return above and below
    raise ValueError(f"unknown check rule {rule!r}; use e.g. '> 0', '>= 1' or '[0, 1)'")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values of a field (its ``choices`` metadata, called if it is a registry's ``names``)."""
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def check_value(f: dataclasses.Field, value: object) -> None:
    """``ConfigError`` if ``value`` (or an item of it) is a NaN, an infinity the field does not allow
    (``allow_inf`` metadata), or outside the field's ``choices`` or ``check``."""
    choices, rule = field_choices(f), f.metadata.get("check")
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is None:
            continue
        non_finite = isinstance(item, float) and not math.isfinite(item)
        if non_finite and (math.isnan(item) or not f.metadata.get("allow_inf")):
            raise ConfigError(f"{f.name} must be a finite number, got {item!r}", f.name)
        if choices is not None and item not in choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {f.name} {item!r}; choose one of {list(choices)}{hint}", f.name)
        if rule is not None and isinstance(item, (int, float)) and not check_passes(rule, item):
            shown = f"in {rule}" if rule.lstrip()[0] in "[(" else rule
            raise ConfigError(f"{f.name} must be {shown}, got {item!r}", f.name)


def check_fields(config: object) -> None:
    """``ConfigError`` for the first field of the dataclass instance ``config`` outside its ``choices``/``check``."""
    for f in dataclasses.fields(config):
        check_value(f, getattr(config, f.name))


def check_paths(config: object, skip: tuple[str, ...] = ()) -> None:
    """``ConfigError`` for the first ``path`` field of ``config`` (not in ``skip``) naming something unusable; a
    field's ``builtins`` (and ``default`` for a model) pass."""
    for f in dataclasses.fields(config):
        kind, value = f.metadata.get("path"), getattr(config, f.name)
        if kind is None or f.name in skip:
            continue
        builtins = tuple(f.metadata.get("builtins", ())) + ((DEFAULT_MODEL,) if kind == "model" else ())
        for item in value if isinstance(value, list) else [value]:
            if item is None or item in builtins:
                continue
            if problem := path_problem(kind, str(item)) or hub_problem(kind, str(item)):
                raise ConfigError(f"{f.name}: {problem}", f.name)


def check_section(cls: type, values: dict, where: str) -> dict:
    """``values`` for some fields of the dataclass ``cls``: keys checked, values coerced and checked field by field
    (``ConfigError`` names ``where``); returns the coerced values."""
    types_ = field_types(cls)
    check_keys(list(values), types_, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    coerced = {k: coerce(v, types_[k], f"{where}: {k}") for k, v in values.items()}
    for key, value in coerced.items():
        try:
            check_value(fields[key], value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}", key) from None
    return coerced


class Config:
    """Base of every command's config dataclass: validates each field's ``choices``/``check`` on construction.

    A subclass with its own ``__post_init__`` (for checks spanning fields) calls ``super().__post_init__()`` first.
    """

    def __post_init__(self) -> None:
        check_fields(self)

    def validate(self) -> None:
        """Check the ``path`` fields (see the module docstring); ``ConfigError`` names the field. Run by the CLI
        after parsing and by the trainers before they load anything."""
        check_paths(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def redefault(base: type, name: str, default: object) -> dataclasses.Field:
    """The field ``name`` of the dataclass ``base`` (help, checks) with another default, for a subclass::

    output_dir: str = redefault(TrainerConfig, "output_dir", "runs/ppo")
    """
    inherited = {f.name: f for f in dataclasses.fields(base)}[name]
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=inherited.metadata)
    return dataclasses.field(default=default, metadata=inherited.metadata)


def type_label(annotation: object) -> str:
    """Short type name for ``--help``: ``INT``, ``FLOAT|NONE``, ``STR [STR ...]``, ``BOOL``, ``MAPPING``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_label(a) for a in args if a is not type(None)) + ("|NONE" if type(None) in args else "")
    if origin is list:
        return type_label(args[0] if args else str)
    if origin is dict or annotation is dict:
        return "MAPPING"
    return getattr(annotation, "__name__", str(annotation)).upper()


def _is_list(annotation: object) -> bool:
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in inner)


def _converter(annotation: object):
    """``argparse`` type function: one command-line string to ``annotation`` (a list field's items stay strings)."""

    def convert(text: str):
        if _is_list(annotation):
            return text
        try:
            return coerce(text, annotation, "")
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(": ")) from None

    convert.__name__ = type_label(annotation).lower()
    return convert


class ConfigParser(HfArgumentParser):
    """The options of one config dataclass (and ``--config FILE``), with help, types and defaults from its fields.

    Each field ``name`` becomes ``--name`` (and ``--name-with-hyphens``); a ``bool`` (or ``bool | None``) field also
    takes a bare ``--name`` (true) and, when it defaults to true, ``--no_name``; a ``list`` field takes ``--name a b``
    or ``--name a,b``; an optional field takes ``none``. Parse errors raise :class:`ConfigError` (one line).

    Args:
        config_class: the dataclass.
        prog: the command, e.g. ``otalign ppo`` (for ``--help`` and errors).
        description: ``--help``'s description.
    """

    def __init__(self, config_class: type, prog: str = "otalign", description: str | None = None) -> None:
        usage = f"{prog} [-h] [--config FILE] [--field value ...]"
        super().__init__(None, prog=prog, usage=usage, description=description, allow_abbrev=False)
        self.config_class = config_class
        self.sections: dict[str, type] = {}
        self.add_argument("--config", metavar="FILE", help="YAML file of option: value (the command line wins)")
        self._add_dataclass_arguments(config_class)

    def error(self, message: str) -> typing.NoReturn:
        message = re.sub(r"^argument (--[\w.]+)(?:/--[\w.-]+)*: ", r"\1: ", message)
        raise ConfigError(message.replace("expected one argument", "needs a value"))

    def _add_dataclass_arguments(self, dtype: type) -> None:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            if "section" in f.metadata:
                section = resolve(f.metadata["section"])
                self.sections[f.name] = section
                group = self.add_argument_group(
                    f"--{f.name}.<field>", f"{f.metadata.get('help', '')}: the fields of {section.__name__}"
                )
                section_hints = typing.get_type_hints(section)
                for sf in dataclasses.fields(section):
                    if sf.init:
                        self._add_field(group, sf, section_hints[sf.name], prefix=f"{f.name}.", suppress=True)
            else:
                self._add_field(self, f, hints[f.name])

    def _add_field(self, container, f: dataclasses.Field, annotation, prefix: str = "", suppress: bool = False) -> None:
        """Let ``HfArgumentParser`` add the field's options, then give them otalign's value parsing and metavar."""
        meta = {k: v for k, v in f.metadata.items() if k not in OWN_METADATA}
        help_text = meta.get("help", "")
        if (rule := f.metadata.get("check")) is not None:
            help_text += f"; must be {'in ' if rule.lstrip()[0] in '[(' else ''}{rule}"
        meta["help"] = help_text.replace("%", "%%")
        plain = copy.copy(f)
        plain.name, plain.type, plain.metadata = prefix + f.name, annotation, types.MappingProxyType(meta)
        if typing.get_origin(annotation) is dict or annotation is dict:
            plain.type, plain.default_factory, plain.default = str, dataclasses.MISSING, "{}"
        before = len(self._actions)
        HfArgumentParser._parse_dataclass_field(container, plain)
        choices = field_choices(f)
        for action in self._actions[before:]:
            if suppress:
                action.default = argparse.SUPPRESS
            if isinstance(action, argparse._StoreFalseAction):
                action.help = f"set {prefix}{f.name} to false"
                continue
            action.type = _converter(annotation)
            if annotation == bool | None and action.nargs is None:  # a bare --flag is true here too (TRL's bf16)
                action.nargs, action.const = "?", True
            label = "{" + ",".join(map(str, choices)) + "}" if choices else type_label(annotation)
            action.metavar = label if action.nargs != "+" else label

    def option_names(self) -> list[str]:
        return [s[2:].replace("-", "_") for a in self._actions for s in a.option_strings if s.startswith("--")]

    def parse(self, argv: list[str] | None = None, config_file: str | Path | None = None, *, validate: bool = False):
        """The config: the dataclass defaults, then the YAML file (``--config`` or ``config_file``), then ``argv``;
        with ``validate``, :meth:`Config.validate` too (its errors name the option or file like the others)."""
        argv = _join_negative_numbers(list(argv or []))
        if "-h" in argv or "--help" in argv:
            self.print_help()
            self.exit(0)
        saved = [(a, a.default) for a in self._actions]
        try:
            for action in self._actions:
                action.default = argparse.SUPPRESS
            namespace, rest = self.parse_known_args(argv)
        finally:
            for action, default in saved:
                action.default = default
        for token in rest:
            if not token.startswith("--") or token == "--":
                raise ConfigError(f"command line: expected --key value, got {token!r}")
            check_keys(
                [token[2:].partition("=")[0].replace("-", "_")], dict.fromkeys(self.option_names()), "command line"
            )
        given = vars(namespace)
        config_file = given.pop("config", None) or config_file
        types_ = field_types(self.config_class)
        values, sources = {}, {}
        if config_file is not None:
            values = read_yaml(config_file, types_)
            sources = dict.fromkeys(values, f"{config_file}: ")
        for key, value in given.items():
            section, _, name = key.rpartition(".")
            annotation = field_types(self.sections[section])[name] if section else types_[key]
            if _is_list(annotation) and isinstance(value, list):
                items = [p for v in value for p in v.split(",") if p]
                # `--reward_fn none`: an optional list field's None, as `reward_fn: null` in YAML
                none = len(items) == 1 and items[0].lower() in NONE and type(None) in typing.get_args(annotation)
                value = None if none else coerce(items, annotation, f"--{key}")
            if section:
                values[section] = {**values.get(section, {}), name: value}
            else:
                values[key], sources[key] = value, "--"
        try:
            config = self.config_class(**values)
            if validate:
                config.validate()
            return config
        except ConfigError as err:
            source = sources.get(err.field)
            if source == "--":
                message = f"--{err}" if re.match(rf"{err.field}[ :.]", str(err)) else f"--{err.field}: {err}"
                raise ConfigError(message, err.field) from None
            if source:
                raise ConfigError(f"{source}{err}", err.field) from None
            raise


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``["--lr", "-1e-3"]`` as ``["--lr=-1e-3"]`` (argparse takes ``-1e-3`` for an option)."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={token}"
                continue
        out.append(token)
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming one key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, types_: dict[str, object]) -> dict[str, object]:
    """The YAML mapping at ``path``, keys checked against ``types_`` and values coerced (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    check_keys(list(data), types_, str(path))
    return {k: coerce(v, types_[k], f"{path}: {k}") for k, v in data.items()}


def parse_config(cls: type, config_file: str | Path | None = None, argv: list[str] | None = None):
    """An instance of the dataclass ``cls`` from a YAML file (optional) and command-line overrides.

    Args:
        cls: a config dataclass (normally a :class:`Config` subclass).
        config_file: YAML mapping of field names to values (``--config FILE`` in ``argv`` wins).
        argv: ``["--key", "value", "--flag", ...]``; applied after the file.

    Raises:
        ConfigError: unknown key, bad type, unreadable file, or a value the dataclass rejects.
    """
    return ConfigParser(cls, prog=f"otalign ({cls.__name__})").parse(argv, config_file)
