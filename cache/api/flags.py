"""Frozen config dataclasses <-> command-line flags: one mapping instead of one hand-written per command.

A field is a flag when its metadata has ``help``::

    port: int = field(default=8080, metadata={"help": "listen port"})

* name: ``--kebab-case`` of the field name, or ``metadata["flag"]``; the parsed value lands in
  ``args.<field name>`` whatever the flag is called (or ``args.<metadata["dest"]>``, for two configs
  on one parser with a field of the same name);
* default: the dataclass default;
* type from the annotation: ``int``, ``float``, ``str`` and ``X | None`` take one value of that type;
  ``bool`` is a switch (``store_true`` when the default is False, ``store_false`` when it is True: name
  that flag ``--no-...``); ``tuple[X, ...]`` is repeatable, and given zero times leaves the default;
* ``metadata["metavar"]`` and ``metadata["choices"]`` pass through to argparse;
* ``metadata["group"]`` names an argument group (``groups`` gives its title and description).

Fields without ``help`` (nested configs, secrets, values that need loading) are not flags: the caller
passes them to ``config_from_args`` as keywords. The gateway and the engine both map their configs with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import socket
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class FlagError(ValueError):
    """A flag's value that cannot work (a taken port, a file that is not a model, a keys file of the wrong
    shape). The message names the flag and the fix; ``prefixgate`` shows it as one line and exits 2,
    before any slow work starts."""


class ArgumentContainer(Protocol):
    """An ``argparse.ArgumentParser`` or one of its argument groups."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any: ...


def flag_fields(config_cls: type, exclude: Collection[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``config_cls`` that are flags (they have ``help``), in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata and f.name not in exclude]


def add_config_arguments(
    parser: ArgumentContainer,
    config_cls: type,
    *,
    exclude: Collection[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    groups: Mapping[str, tuple[str, str]] | None = None,
) -> None:
    """Add a flag for every flag field of ``config_cls`` but ``exclude``; ``overrides[name]`` adds or
    replaces argparse keywords of one flag (e.g. ``choices`` known only where the parser is built);
    ``groups[name] = (title, description)`` for the argument groups fields name in their metadata."""
    hints = typing.get_type_hints(config_cls)
    made: dict[str, ArgumentContainer] = {}
    for f in flag_fields(config_cls, exclude):
        target = parser
        if (group := f.metadata.get("group")) is not None:
            if group not in made:
                title, description = (groups or {}).get(group, (group, None))
                made[group] = parser.add_argument_group(title, description)  # type: ignore[attr-defined]
            target = made[group]
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": _dest(f), "help": f.metadata["help"]}
        kwargs.update(_value_kwargs(f, hints[f.name]))
        for key in ("metavar", "choices"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        kwargs.update((overrides or {}).get(f.name, {}))
        target.add_argument(flag, **kwargs)


def config_from_args(config_cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """``config_cls`` from parsed flags; ``values`` set fields directly (and win over flags). A field
    neither given nor a flag keeps its default; so does a repeatable flag given zero times."""
    hints = typing.get_type_hints(config_cls)
    for f in flag_fields(config_cls, exclude=values):
        if not hasattr(args, _dest(f)):
            continue  # excluded when the parser was built
        value = getattr(args, _dest(f))
        if _is_tuple(hints[f.name]):
            if not value:
                continue
            value = tuple(value)
        values[f.name] = value
    return config_cls(**values)


def _dest(f: dataclasses.Field) -> str:
    return f.metadata.get("dest", f.name)


def _value_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise TypeError(f"flag field {f.name!r} needs a default")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if hint is bool:
        return {"action": "store_false" if default else "store_true", "default": default}
    if _is_tuple(hint):
        return {"action": "append", "type": typing.get_args(hint)[0], "default": None}
    return {"type": _value_type(f.name, hint), "default": default}


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _value_type(name: str, hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            hint = options[0]
    if hint not in (int, float, str):
        raise TypeError(f"field {name!r}: no flag for type {hint!r}; pass it to config_from_args instead")
    return hint


def check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` and let it go: a taken port is found now, not after the engines have loaded."""
    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR, as aiohttp binds
            pass
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise port_taken(host, port) from None
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise FlagError(
            f"--host {host} --port {port}: cannot listen there ({reason}); choose another --host or --port"
        ) from None


def port_taken(host: str, port: int) -> FlagError:
    return FlagError(
        f"--port {port}: {host}:{port} is already in use; stop what listens there or choose another --port"
    )
