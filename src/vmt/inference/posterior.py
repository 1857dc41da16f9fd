"""Posterior latent states of a text, exported to ArviZ.

:func:`posterior_states` draws ``S = chains * draws`` state paths ``x_{1:n} ~ q(x | y)`` by
reading the text with the guide (a bounded window, see :mod:`vmt.inference.reading`). Guide
draws are independent, so "chains" are independent groups of draws from separate random
streams; their agreement (R-hat, ESS) checks the sampler's plumbing rather than mixing.

The result is an :class:`xarray.DataTree` with groups

* ``posterior``: ``x`` with dims ``(chain, draw, time, state)``;
* ``log_likelihood``: ``y`` = ``log p(y_k | x_k)`` with dims ``(chain, draw, time)``;
* ``posterior_predictive``: ``y`` a token drawn from ``p(y | x_k)`` ``(chain, draw, time)``
  (``(..., obs)`` for vector observations);
* ``observed_data``: ``y`` the text ``(time,)`` (or ``(time, obs)``);

with coordinates ``time = 0..n-1``, ``state = 0..D-1``, and, for token data, a ``token``
coordinate along ``time`` holding the token labels (decoded strings when a tokenizer is given,
else the ids). Summaries use :mod:`arviz_stats`; plots are written with matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vmt.inference.reading import FeatureFn, ReadConfig, read


def posterior_states(
    vmt,
    tokens: torch.Tensor,
    *,
    chains: int = 4,
    draws: int = 100,
    window: int = 256,
    feature_fn: FeatureFn | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
):
    """``chains * draws`` posterior paths of ``tokens`` as an ArviZ ``DataTree``.

    Args:
        vmt: the fitted model.
        tokens: ``(time,)`` int64 or ``(time, obs)`` observations.
        chains: independent groups of draws (each from its own seed ``seed + chain``).
        draws: paths per chain.
        window: reading window ``W`` (each path is read as in :func:`~vmt.inference.reading.read`).
        feature_fn: guide features (default: the VMT's reader).
        labels: one label per token for the ``token`` coordinate (default: the ids).
        seed: base seed; the global torch RNG is left as it was.
        progress: show a progress bar over the chains (stderr).

    Returns:
        ``xarray.DataTree`` (see the module docstring for groups, dims and coordinates).
    """
    from arviz_base import from_dict

    if chains < 1 or draws < 1:
        raise ValueError(f"chains and draws must be >= 1, got {chains} and {draws}")
    n = tokens.shape[0]
    categorical = vmt.config.emits_tokens
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} tokens")
    paths, loglik, predictive = [], [], []
    config = ReadConfig(window=window, keep_path=True)
    with torch.random.fork_rng(devices=[]):
        for c in tqdm(range(chains), desc="posterior chains", disable=not progress, leave=False):
            torch.manual_seed(seed + c)
            res = read(vmt, tokens, config, feature_fn, samples=draws)
            x = res.path  # (draw, time, state)
            with torch.no_grad():
                obs = tokens.expand(draws, *tokens.shape)
                loglik.append(vmt.emission.log_prob(x, obs))
                predictive.append(vmt.emission.distribution(x).sample())
            paths.append(x)
    x = torch.stack(paths).double().numpy()
    ll = torch.stack(loglik).double().numpy()
    pp = torch.stack(predictive).numpy()
    y = tokens.numpy()
    d = vmt.config.state_dim
    coords: dict = {"time": np.arange(n), "state": np.arange(d)}
    y_dims = ["time"]
    if not categorical:
        coords["obs"] = np.arange(tokens.shape[1])
        y_dims = ["time", "obs"]
    tree = from_dict(
        {
            "posterior": {"x": x},
            "log_likelihood": {"y": ll},
            "posterior_predictive": {"y": pp},
            "observed_data": {"y": y},
        },
        coords=coords,
        dims={"x": ["time", "state"], "y": y_dims},
    )
    if categorical:
        token = np.asarray(labels if labels is not None else y.tolist())
        for group in ("posterior", "log_likelihood", "posterior_predictive", "observed_data"):
            tree[group] = tree[group].to_dataset().assign_coords(token=("time", token))
    return tree


def summarize(tree, ci_prob: float = 0.9):
    """``arviz_stats.summary`` of the states: mean, sd, HDI, ESS and R-hat per (time, state)."""
    from arviz_stats import summary

    return summary(tree, var_names=["x"], ci_prob=ci_prob, ci_kind="hdi", round_to="none")


def mean_sd(tree) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and sd of the states over ``(chain, draw)``: each ``(time, state)``."""
    x = tree["posterior"]["x"]
    return (x.mean(("chain", "draw")).values, x.std(("chain", "draw"), ddof=1).values)


def _hdi(values, prob: float):
    from arviz_stats import hdi

    return hdi(values, prob=prob, dim=["chain", "draw"])


def plot_trajectories(tree, path: str | Path, states: list[int] | None = None,
                      prob: float = 0.9) -> Path:
    """Posterior mean of selected state dimensions over time with ``prob`` HDI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = tree["posterior"]["x"]
    states = list(range(min(4, x.sizes["state"]))) if states is None else states
    mean = x.mean(("chain", "draw"))
    band = _hdi(x, prob)
    t = x["time"].values
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for s in states:
        line = ax.plot(t, mean.sel(state=s).values, label=f"state {s}")[0]
        lo = band.sel(state=s, ci_bound="lower").values
        hi = band.sel(state=s, ci_bound="upper").values
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    _token_ticks(ax, x)
    ax.set_xlabel("position")
    ax.set_ylabel("state")
    ax.set_title(f"posterior state trajectories ({int(prob * 100)}% HDI)")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_projection(tree, path: str | Path) -> Path:
    """A 2-D PCA projection of the posterior mean states, coloured by position; the draws of
    every position are shown faintly behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = tree["posterior"]["x"].values  # chain, draw, time, state
    mean = x.mean((0, 1))
    centre = mean.mean(0)
    _, _, vt = np.linalg.svd(mean - centre, full_matrices=False)
    basis = vt[:2].T if vt.shape[0] >= 2 else np.eye(mean.shape[1])[:, :2]
    proj_mean = (mean - centre) @ basis
    draws = (x.reshape(-1, x.shape[-2], x.shape[-1])[:50] - centre) @ basis
    t = np.arange(mean.shape[0])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(draws[..., 0].ravel(), draws[..., 1].ravel(), c=np.tile(t, draws.shape[0]),
               s=3, alpha=0.08, cmap="viridis")
    points = ax.scatter(proj_mean[:, 0], proj_mean[:, 1], c=t, s=18, cmap="viridis")
    ax.plot(proj_mean[:, 0], proj_mean[:, 1], color="grey", linewidth=0.5)
    fig.colorbar(points, ax=ax, label="position")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("posterior states (PCA of the means)")
    return _save(fig, path)


def plot_predictive(tree, path: str | Path, prob: float = 0.9) -> Path:
    """Posterior predictive probability ``p(y_k | x_k)`` of each observed token, with HDI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ll = tree["log_likelihood"]["y"]
    p = np.exp(ll)
    band = _hdi(p, prob)
    t = ll["time"].values
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(t, p.mean(("chain", "draw")).values, marker="o", markersize=3)
    ax.fill_between(t, band.sel(ci_bound="lower").values, band.sel(ci_bound="upper").values,
                    alpha=0.25, linewidth=0)
    _token_ticks(ax, ll)
    ax.set_ylim(0, 1)
    ax.set_xlabel("position")
    ax.set_ylabel("p(observed token | state)")
    ax.set_title("posterior predictive check")
    return _save(fig, path)


def _token_ticks(ax, data) -> None:
    if "token" in data.coords and data.sizes["time"] <= 40:
        ax.set_xticks(data["time"].values)
        ax.set_xticklabels([str(s) for s in data["token"].values], rotation=90, fontsize=7)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
