"""A plain, idiomatic per-time-step Pyro model and guide (``pyro.markov`` loop).

This is the slow reference the vectorised chain sites are tested against: the same
networks, one ``x_k`` and one ``y_k`` site per time step. It supports rows that all start at
position 0 (optionally all from a carried state) with any end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import torch

from vmt.models.batch import ChainBatch

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer


def _check(batch: ChainBatch) -> None:
    if bool((batch.start != 0).any()):
        raise ValueError("the reference model needs every row to start at position 0")


def reference_model(vmt: VariationalMarkovTransformer, batch: ChainBatch, direction: str = "forward") -> None:
    _check(batch)
    transition = vmt.transition_for(direction)
    mask = batch.mask()
    carried = batch.carried_rows()
    with pyro.plate("chains", batch.num_rows):
        x_prev = None
        for k in pyro.markov(range(batch.num_steps)):
            if k == 0 and not bool(carried.any()):
                fn = vmt.prior.distribution().expand([batch.num_rows])
            else:
                if k == 0 and not bool(carried.all()):
                    raise ValueError("the reference model needs all rows carried or none")
                fn = transition.distribution(batch.x0 if k == 0 else x_prev)
            x_prev = pyro.sample(f"x_{k}", fn.mask(mask[:, k]))
            pyro.sample(f"y_{k}", vmt.emission.distribution(x_prev).mask(mask[:, k]), obs=batch.obs[:, k])


def reference_guide(vmt: VariationalMarkovTransformer, batch: ChainBatch, direction: str = "forward") -> None:
    _check(batch)
    net = vmt.guide_net_for(direction)
    context = vmt.guide_context(batch, direction)
    mask = batch.mask()
    carried = bool(batch.carried_rows().any())
    with pyro.plate("chains", batch.num_rows):
        x_prev = None
        for k in pyro.markov(range(batch.num_steps)):
            if k == 0 and not carried:
                loc, scale, combined = net.first_params(context[:, 0])
            else:
                prev = batch.x0 if k == 0 else x_prev
                loc, scale, combined = net.step_params(prev, net.skip_context(context[:, k], 1))
            fn = net.distribution(loc, scale, combined)
            x_prev = pyro.sample(f"x_{k}", fn.mask(mask[:, k]))


def reference_path(trace) -> torch.Tensor:
    """Stack the ``x_k`` sites of a reference guide trace into ``(batch, time, state)``."""
    names = sorted((n for n in trace.nodes if n.startswith("x_")), key=lambda n: int(n[2:]))
    return torch.stack([trace.nodes[n]["value"] for n in names], dim=1)
