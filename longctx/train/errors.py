"""User mistakes end in one line that names the key or file and the fix, and a non-zero exit.

    with one_line_errors():   # ConfigError / DataError -> "error: ..." on stderr, exit 1
        train(config)

`HYDRA_FULL_ERROR=1` keeps the whole traceback, as it does for Hydra's own errors.

Command-line overrides are checked against the schema before Hydra composes the config
(`refuse_bad_overrides`), each mistake in one line. Hydra itself refuses `train.stepz=3` with a
message that suggests `+train.stepz=3`, and that form it accepts, after which OmegaConf drops the
key when it builds the typed config: the run would start without the setting the user asked for.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from longctx import cli
from longctx.data import DataError

from .config import REPO_ROOT, Config, ConfigError, command_line_overrides


class RunError(ConfigError):
    """A run stopped by what the user can act on, found while it runs: a non-finite loss, a full
    disk, a checkpoint of another shape. One line, as a config error."""


@contextmanager
def one_line_errors():
    """A mistake of the user's exits with its one-line message, once under torchrun (the traceback
    with HYDRA_FULL_ERROR=1); longctx.cli does the printing for every entry point."""
    with cli.one_line_errors(ConfigError, DataError):
        yield


def _dataclass_of(annotation):
    """The dataclass a field holds, or None (a str, a list, an Optional[str] ...)."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def unknown_key(key: str, schema=Config) -> Optional[str]:
    """Why the dotted `key` is not a setting of `schema` (one line with the nearest keys), or None."""
    node, path = schema, []
    for part in key.split("."):
        if node is None:   # below a list or a free-form value: not checked here
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            parent = ".".join(path)
            names = [f"{parent}.{name}" if parent else name for name in fields]
            full = f"{parent}.{part}" if parent else part
            near = difflib.get_close_matches(full, names, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            return (f"{full} is not a setting: {hint}the keys {'of ' + parent if parent else 'at the top'} "
                    f"are {', '.join(fields)}")
        hints = typing.get_type_hints(node)
        node = _dataclass_of(hints[part])
        path.append(part)
    return None


def _value_error(schema, key: str, value, text: str) -> Optional[str]:
    """Why `value` cannot be the setting `key` (OmegaConf's own type check), or None."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException, ValidationError
    try:
        OmegaConf.update(schema, key, value, merge=False)
    except ValidationError as error:
        return f"{key}={text}: {str(error).splitlines()[0]}"
    except OmegaConfBaseException:
        return None   # not a question of type: Hydra's merge decides
    return None


def override_error(argv: list[str]) -> Optional[str]:
    """The first command-line override (`key=value`, `+key=value`, `++key=value`, `~key`) that the
    schema refuses, as one line: an unknown key, a `+` on a key that exists, a value of the wrong
    type. None when all are fine; what this does not check, Hydra does."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        overrides = command_line_overrides(argv)
    except HydraException:
        return None   # a syntax error: Hydra reports it
    schema = OmegaConf.structured(Config)
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra" or "/" in key:
            continue   # Hydra's own settings, config groups of Hydra
        if override.package is not None:
            continue   # `group@package=choice`: a config group placed elsewhere
        problem = unknown_key(key)   # a group choice (model=tiny) is a top-level key of the schema
        if problem is not None:
            return problem
        if "." not in key and (Path(REPO_ROOT) / "configs" / key).is_dir():
            continue   # model=tiny, experiment=...: a choice of config file, not a value
        if override.is_delete() or override.is_sweep_override():
            continue
        text = override.get_value_element_as_str()
        if override.is_add() and not override.is_force_add():
            return f"{key} is already a setting: drop the + ({key}={text})"
        problem = _value_error(schema, key, override.value(), text)
        if problem is not None:
            return problem
    return None


def refuse_bad_overrides(argv: Optional[list[str]] = None) -> None:
    problem = override_error(sys.argv[1:] if argv is None else argv)
    if problem is not None:
        cli.exit_with_line(problem)
