"""The base class of every probabilistic part of a VMT: a ``PyroModule`` with local parameters.

A VMT keeps its parameters in its modules (torch style: ``state_dict``, optimisers over
``parameters()``, several models side by side), not in Pyro's global parameter store. Pyro
reads its ``module_local_params`` setting twice: when a ``PyroModule`` is constructed (which
parameter state it keeps) and on every call (where a parameter is looked up), so the setting
must be on before the first part is built and stay on while parts run. Importing
:mod:`vmt.models` changes nothing; constructing a :class:`LocalParamsModule` turns the setting
on (:func:`use_module_local_params`), for the whole process, since Pyro has one setting.
"""

from __future__ import annotations

import pyro
from pyro.nn import PyroModule

__all__ = ["LocalParamsModule", "use_module_local_params"]


def use_module_local_params() -> None:
    """Turn on Pyro's ``module_local_params`` (idempotent; a process-wide Pyro setting)."""
    if not pyro.settings.get("module_local_params"):
        pyro.settings.set(module_local_params=True)


class LocalParamsModule(PyroModule):
    """A ``PyroModule`` whose parameters live in the module (see the module docstring)."""

    def __init__(self, name: str = "") -> None:
        use_module_local_params()
        super().__init__(name)
