"""Configurations from JSON objects: one reading of a dict into a dataclass for every config.

:func:`config_from_dict` is the ``from_dict`` of :class:`vmt.models.config.VMTConfig`,
:class:`vmt.inference.train.TrainConfig`, :class:`vmt.experiment.ModelPreset` and
:class:`vmt.experiment.Schedule`: unknown keys are a ``ValueError`` naming them, nested
configurations are read by the function given for their field, and the dataclass's own
``__post_init__`` checks the values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["config_from_dict", "known_fields"]

C = TypeVar("C")


def known_fields(cls: type, data: Any, what: str, ignore: Iterable[str] = ()) -> dict:
    """A copy of ``data`` as keyword arguments of dataclass ``cls``, without the keys ``ignore``.

    Raises ``ValueError`` if ``data`` is not a dict or has keys that are not fields of ``cls``
    (the message names them, ``what`` names the configuration).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k not in set(ignore)}
    unknown = sorted(set(kwargs) - names, key=str)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown} (known: {sorted(names)})")
    return kwargs


def config_from_dict(
    cls: type[C],
    data: Any,
    what: str | None = None,
    nested: dict[str, Callable[[Any], Any]] | None = None,
    ignore: Iterable[str] = (),
) -> C:
    """``cls(**data)`` after :func:`known_fields`, with ``nested[name](data[name])`` for the
    nested configurations (in the order of ``nested``) and the keys ``ignore`` dropped.

    Args:
        cls: a dataclass.
        data: its fields as a JSON object.
        what: the configuration's name in error messages (default: the class name).
        nested: field name -> reader of that field's value (e.g. another ``from_dict``).
        ignore: keys accepted and dropped (e.g. a free-text description kept elsewhere).
    """
    kwargs = known_fields(cls, data, what or cls.__name__, ignore)
    for name, read in (nested or {}).items():
        if name in kwargs:
            kwargs[name] = read(kwargs[name])
    return cls(**kwargs)
