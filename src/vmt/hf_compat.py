"""The one place vmt adapts to differences between transformers releases.

transformers 5.24 renamed the key/value cache of the models' ``forward``, of their outputs and of
the mask builders in ``transformers.masking_utils`` from ``past_key_values`` to ``cache``; the old
name still works there but warns. vmt passes and reads the cache under whichever name the
installed release declares, found once per function from its signature.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.cache
def cache_keyword(fn: Callable) -> str:
    """The keyword under which ``fn`` takes the KV cache: ``"cache"`` if declared, else ``"past_key_values"``.

    Decorated functions are inspected through ``__wrapped__`` (what ``inspect.signature`` follows),
    so a deprecation shim that still accepts the old name does not hide the new one.
    """
    parameters = inspect.signature(fn).parameters
    for name in (NEW_NAME, OLD_NAME):
        if name in parameters:
            return name
    name = getattr(fn, "__qualname__", repr(fn))
    raise ValueError(f"{name} takes neither 'cache' nor 'past_key_values' (it takes {list(parameters)})")


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for calling ``model(...)``, the keyword read from ``type(model).forward``."""
    return {cache_keyword(type(model).forward): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model returned: its ``cache`` field where the output declares one, else ``past_key_values``."""
    if dataclasses.is_dataclass(output):
        names = {f.name for f in dataclasses.fields(output)}
        for name in (NEW_NAME, OLD_NAME):
            if name in names:
                return getattr(output, name)
    raise ValueError(f"{type(output).__name__} has neither a 'cache' nor a 'past_key_values' field")
