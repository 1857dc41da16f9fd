"""SVI step time: the vectorised one-site ELBO against a per-step ``pyro.markov`` model.

All paths run the same model networks on the same batch (batch 16, state 32, vocabulary 1000,
categorical emission, gated transition, random guide features of dimension 64). One SVI step
is: forward ELBO, backward, one Adam step.

* **reference**: ``Trace_ELBO().differentiable_loss`` of the plain per-step model and guide in
  :mod:`vmt.models.reference` (one ``x_k`` and one ``y_k`` site per time step), gated guide;
* **stepwise**: :func:`vmt.inference.elbo.elbo_terms` with the gated guide sampling its path
  by :meth:`~vmt.models.chain.GuideChain.rsample_stepwise` (the loop before the lean loop),
  every log-density term scored for all positions at once (one Pyro site per chain);
* **lean**: the same with the lean loop of :mod:`vmt.models.lean_loop` (the library default
  for the gated guide);
* **scan**: the same with the affine guide (``guide="affine"``, diagonal) whose path is
  sampled by a parallel scan (:mod:`vmt.models.scan`).

Times are medians of interleaved repeats (:func:`vmt.benchmarks.timing.interleaved_medians`)
and are reported only as ratios. The same run checks, in float64, that the gated guide's fast
ELBO equals the per-step reference on identical draws, and that the scan guide's ELBO equals
the per-step model and guide (with the affine guide network) scoring the same path; losses and
gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from vmt.benchmarks.report import BenchResult, markdown_table
from vmt.benchmarks.timing import interleaved_medians, measure_lengths
from vmt.inference.elbo import elbo_terms
from vmt.models import ChainBatch, VariationalMarkovTransformer, VMTConfig
from vmt.models.chain import GuideChain
from vmt.models.reference import reference_guide, reference_model

if TYPE_CHECKING:
    from vmt.models.vmt import VariationalMarkovTransformer

NAME = "svi-speed"
SUMMARY = "SVI step time: one-site vectorised ELBO vs a per-step pyro.markov model"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SviSpeedSetup:
    """Sizes of the benchmark problem.

    Attributes:
        batch: chains per SVI step.
        state_dim: latent state dimension ``D``.
        vocab: vocabulary size of the categorical emission.
        feature_dim: dimension of the (random) guide features ``h``.
        lr: Adam learning rate of the timed steps.
        seed: seed of the model, the data and the draws of the agreement check.
        threads: torch intra-op threads during the measurement.
    """

    batch: int = 16
    state_dim: int = 32
    vocab: int = 1000
    feature_dim: int = 64
    lr: float = 1e-3
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "state_dim", "vocab", "feature_dim", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class LengthResult:
    """What was measured at one sequence length.

    Attributes:
        length: time steps ``L``.
        speedup: reference step time / fast step time with the gated guide's lean loop (the
            library default).
        speedup_stepwise: the same with the step-by-step loop.
        speedup_scan: reference step time / step time with the scan (affine) guide.
        guide_loop_share: time of the step-by-step guide loop alone (sampling the path,
            forward and backward) as a fraction of the stepwise step.
        lean_loop_share: time of the lean loop alone as a fraction of the lean step.
        scan_share: time of the scan guide's sampling alone (forward and backward) as a
            fraction of the scan step.
        rel_loss_diff: ``|fast - reference| / |reference|`` of the loss on identical draws.
        rel_grad_diff: largest ``max|g_fast - g_ref| / max|g_ref|`` over parameter tensors.
        scan_rel_loss_diff, scan_rel_grad_diff: the same for the scan guide against the
            per-step model and guide scoring the same path.
        repeats: interleaved repeats behind each median.
    """

    length: int
    speedup: float
    speedup_stepwise: float
    speedup_scan: float
    guide_loop_share: float
    lean_loop_share: float
    scan_share: float
    rel_loss_diff: float
    rel_grad_diff: float
    scan_rel_loss_diff: float
    scan_rel_grad_diff: float
    repeats: int


def build(setup: SviSpeedSetup, length: int) -> tuple[VariationalMarkovTransformer, ChainBatch]:
    """A freshly initialised VMT and a batch of ``setup.batch`` chains of ``length`` steps."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    gen = torch.Generator().manual_seed(setup.seed)
    torch.manual_seed(setup.seed)
    config = VMTConfig(
        state_dim=setup.state_dim, obs_dim=setup.vocab, feature_dim=setup.feature_dim,
        emission="categorical", transition="gated", max_window=max(1024, length),
    )
    vmt = VariationalMarkovTransformer(config)
    rows = setup.batch
    batch = ChainBatch(
        obs=torch.randint(0, setup.vocab, (rows, length), generator=gen),
        start=torch.zeros(rows, dtype=torch.long),
        end=torch.full((rows,), length, dtype=torch.long),
        features=torch.randn(rows, length, setup.feature_dim, generator=gen),
    )
    return vmt, batch


def scan_vmt(vmt: VariationalMarkovTransformer) -> VariationalMarkovTransformer:
    """A copy of ``vmt`` with the affine (scan) guide in place of its guide; the prior,
    transition and emission are the same networks with the same weights."""
    config = dataclasses.replace(vmt.config, guide="affine", affine_structure="diagonal")
    scan = VariationalMarkovTransformer(config).to(next(vmt.parameters()).dtype)
    shared = {k: v for k, v in vmt.state_dict().items() if not k.startswith("guide_net.")}
    scan.load_state_dict(shared, strict=False)
    return scan


def fast_loss(vmt: VariationalMarkovTransformer, batch: ChainBatch) -> torch.Tensor:
    """``-ELBO`` summed over chains, by the vectorised path."""
    return -elbo_terms(vmt, batch).elbo_per_row().sum()


def reference_loss(
    vmt: VariationalMarkovTransformer, batch: ChainBatch, elbo: Trace_ELBO | None = None
) -> torch.Tensor:
    """``-ELBO`` summed over chains, by Pyro's ``Trace_ELBO`` on the per-step model."""
    elbo = Trace_ELBO() if elbo is None else elbo
    return elbo.differentiable_loss(partial(reference_model, vmt), partial(reference_guide, vmt), batch)


def _relative_differences(fast, ref, g_fast, g_ref) -> tuple[float, float]:
    rel_loss = float(((fast - ref).abs() / ref.abs()).detach())
    rel_grad = 0.0
    for gf, gr in zip(g_fast, g_ref, strict=True):
        gf = torch.zeros_like(gr) if gf is None and gr is not None else gf
        gr = torch.zeros_like(gf) if gr is None and gf is not None else gr
        if gf is None:
            continue
        scale = float(gr.abs().max())
        diff = float((gf - gr).abs().max())
        if scale > 0:
            rel_grad = max(rel_grad, diff / scale)
        elif diff > 0:
            rel_grad = math.inf
    return rel_loss, rel_grad


def loss_agreement(
    vmt: VariationalMarkovTransformer, batch: ChainBatch, seed: int
) -> tuple[float, float]:
    """Relative loss and gradient differences of the two paths on the same draws (float64).

    Both guides draw one ``(batch, state)`` standard-normal block per time step in the same
    order, so with the same seed they sample the same path; float64 leaves only the summation
    order as a difference.
    """
    v64 = copy.deepcopy(vmt).double()
    b64 = batch.with_(features=batch.features.double())
    params = [p for p in v64.parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    fast = fast_loss(v64, b64)
    g_fast = torch.autograd.grad(fast, params, allow_unused=True)
    pyro.set_rng_seed(seed)
    ref = reference_loss(v64, b64)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    return _relative_differences(fast, ref, g_fast, g_ref)


def scan_agreement(
    vmt: VariationalMarkovTransformer, batch: ChainBatch, seed: int
) -> tuple[float, float]:
    """Relative loss and gradient differences (float64) between the scan guide's ELBO and the
    per-step model and guide (one site per step, the same affine guide network) scoring the
    path the scan sampled; gradients flow through that path into the scan in both."""
    v64 = copy.deepcopy(vmt).double()
    b64 = batch.with_(features=batch.features.double())
    params = [p for p in v64.parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    terms = elbo_terms(v64, b64)
    fast = -terms.elbo_per_row().sum()
    g_fast = torch.autograd.grad(fast, params, retain_graph=True, allow_unused=True)
    data = {f"x_{k}": terms.x[:, k] for k in range(b64.num_steps)}
    guide_tr = poutine.trace(poutine.condition(partial(reference_guide, v64), data)).get_trace(b64)
    model_tr = poutine.trace(poutine.condition(partial(reference_model, v64), data)).get_trace(b64)
    ref = guide_tr.log_prob_sum() - model_tr.log_prob_sum()
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    return _relative_differences(fast, ref, g_fast, g_ref)


def _svi_step(vmt: VariationalMarkovTransformer, batch, optimizer, loss_fn) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(vmt, batch).backward()
    optimizer.step()


def _guide_loop(vmt: VariationalMarkovTransformer, batch) -> None:
    """The guide's sampling alone: sample the path (loop or scan), backpropagate through it."""
    vmt.zero_grad(set_to_none=True)
    chain = GuideChain(vmt.guide_net, vmt.guide_context(batch), batch)
    chain.rsample().sum().backward()


def _stepwise(fn, *args) -> None:
    """``fn(*args)`` with the gated guide stepping by ``rsample_stepwise``."""
    previous = GuideChain.use_lean_loop
    GuideChain.use_lean_loop = False
    try:
        fn(*args)
    finally:
        GuideChain.use_lean_loop = previous


def measure_length(setup: SviSpeedSetup, length: int, repeats: int) -> LengthResult:
    """Time the SVI steps at one length (same threads, interleaved) and check agreement."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    vmt, batch = build(setup, length)
    rel_loss, rel_grad = loss_agreement(vmt, batch, setup.seed)
    torch.manual_seed(setup.seed)
    scan = scan_vmt(vmt)
    scan_loss, scan_grad = scan_agreement(scan, batch, setup.seed)
    # separate copies so each path follows its own optimisation trajectory
    models = {k: copy.deepcopy(vmt) for k in ("stepwise", "lean", "reference")}
    models["scan"] = scan
    opts = {k: torch.optim.Adam(m.parameters(), lr=setup.lr) for k, m in models.items()}
    ref_elbo = Trace_ELBO()
    fns = {
        "reference": lambda: _svi_step(models["reference"], batch, opts["reference"],
                                       partial(reference_loss, elbo=ref_elbo)),
        "stepwise": lambda: _stepwise(_svi_step, models["stepwise"], batch, opts["stepwise"],
                                      fast_loss),
        "lean": lambda: _svi_step(models["lean"], batch, opts["lean"], fast_loss),
        "scan": lambda: _svi_step(models["scan"], batch, opts["scan"], fast_loss),
        "stepwise_loop": lambda: _stepwise(_guide_loop, models["stepwise"], batch),
        "lean_loop": lambda: _guide_loop(models["lean"], batch),
        "scan_sampling": lambda: _guide_loop(models["scan"], batch),
    }
    times = interleaved_medians(fns, repeats=repeats, warmup=1)
    result = LengthResult(
        length=length,
        speedup=times["reference"] / times["lean"],
        speedup_stepwise=times["reference"] / times["stepwise"],
        speedup_scan=times["reference"] / times["scan"],
        guide_loop_share=times["stepwise_loop"] / times["stepwise"],
        lean_loop_share=times["lean_loop"] / times["lean"],
        scan_share=times["scan_sampling"] / times["scan"],
        rel_loss_diff=rel_loss,
        rel_grad_diff=rel_grad,
        scan_rel_loss_diff=scan_loss,
        scan_rel_grad_diff=scan_grad,
        repeats=repeats,
    )
    logger.info("svi-speed L=%d: %s", length, result)
    return result


def measure(
    lengths: list[int], repeats: int | list[int], setup: SviSpeedSetup | None = None
) -> dict[int, LengthResult]:
    """Measure every length; ``repeats`` is one count or one per length."""
    setup = SviSpeedSetup() if setup is None else setup
    return measure_lengths(measure_length, setup, lengths, repeats)


def metrics_of(results: dict[int, LengthResult]) -> dict[str, float]:
    """Flat metric names: ``speedup_L{L}``, ``speedup_scan_L{L}``, ``max_rel_loss_diff_L{L}``,
    ... for every length."""
    out: dict[str, float] = {}
    for L, r in results.items():
        out[f"speedup_L{L}"] = r.speedup
        out[f"speedup_stepwise_L{L}"] = r.speedup_stepwise
        out[f"speedup_scan_L{L}"] = r.speedup_scan
        out[f"guide_loop_share_L{L}"] = r.guide_loop_share
        out[f"lean_loop_share_L{L}"] = r.lean_loop_share
        out[f"scan_share_L{L}"] = r.scan_share
        # the speedup if everything but the step-by-step guide loop cost nothing
        out[f"speedup_bound_guide_loop_only_L{L}"] = r.speedup_stepwise / r.guide_loop_share
        out[f"max_rel_loss_diff_L{L}"] = r.rel_loss_diff
        out[f"max_rel_grad_diff_L{L}"] = r.rel_grad_diff
        out[f"scan_rel_loss_diff_L{L}"] = r.scan_rel_loss_diff
        out[f"scan_rel_grad_diff_L{L}"] = r.scan_rel_grad_diff
    out["max_rel_loss_diff"] = max(max(r.rel_loss_diff, r.scan_rel_loss_diff) for r in results.values())
    return out


def plot(results: dict[int, LengthResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(results)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for attr, label in (("speedup_scan", "scan guide"), ("speedup", "gated guide, lean loop"),
                        ("speedup_stepwise", "gated guide, step-by-step loop")):
        ax.plot(lengths, [getattr(results[L], attr) for L in lengths], "o-", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("sequence length L (time steps)")
    ax.set_ylabel("SVI step speedup over per-step Pyro (x)")
    ax.set_ylim(bottom=0)
    ax.set_title("one-site ELBO vs per-step pyro.markov")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _markdown(results: dict[int, LengthResult], setup: SviSpeedSetup, figure: str) -> str:
    rows = [
        [L, r.speedup_stepwise, r.speedup, r.speedup_scan, r.guide_loop_share, r.lean_loop_share,
         r.scan_share, f"{r.rel_loss_diff:.1e}", f"{r.rel_grad_diff:.1e}",
         f"{r.scan_rel_loss_diff:.1e}", f"{r.scan_rel_grad_diff:.1e}", r.repeats]
        for L, r in sorted(results.items())
    ]
    table = markdown_table(
        ["L", "speedup: gated, step-by-step loop (x)", "speedup: gated, lean loop (x)",
         "speedup: scan guide (x)", "step-by-step loop / its step", "lean loop / its step",
         "scan sampling / its step", "gated: rel. loss diff", "gated: rel. grad diff",
         "scan: rel. loss diff", "scan: rel. grad diff", "repeats"],
        rows,
    )
    L = 1024 if 1024 in results else max(results)
    r = results[L]
    lengths = sorted(results)
    grows = all(results[a].speedup_scan <= results[b].speedup_scan
                for a, b in zip(lengths, lengths[1:], strict=False))
    return f"""\
One SVI step (forward ELBO, backward, Adam) of the vectorised path
(`vmt.inference.elbo.elbo_terms`: one Pyro site per chain, every log-density scored for all
positions at once) against the plain per-step reference (`Trace_ELBO` on a `pyro.markov` model
and guide with one `x_k` and one `y_k` site per time step, gated guide), with the same model
networks: batch {setup.batch}, state {setup.state_dim}, vocabulary {setup.vocab} (categorical
emission), gated transition, random guide features of dimension {setup.feature_dim}, float32,
{setup.threads} torch thread(s). Three guides on the fast path:

* **gated, step-by-step loop**: the gated (combiner) guide sampling its path with
  `GuideChain.rsample_stepwise`, the loop the library used before;
* **gated, lean loop**: the same guide with the lean loop (`vmt.models.lean_loop`: the head's
  context half precomputed for all positions, the two maps of the previous state fused into one
  `addmm`, no distribution objects) — the library default, same values and gradients;
* **scan guide**: `guide="affine"` (diagonal), `q(x_k | x_(k-1), h_k) = N(A_k x_(k-1) + b_k,
  diag s_k^2)` with `A, b, s` from the features for all positions in one call, the path
  sampled by a parallel scan (`vmt.models.scan`, `O(log L)` sequential depth).

Times are medians of interleaved repeats (warm-up excluded) and only ratios are reported. The
agreement columns are measured in the same run, in float64: the gated guide's fast ELBO against
the per-step reference fed the same random draws, and the scan guide's ELBO against the per-step
model and guide (with the same affine guide network, one site per step) scoring the path the
scan sampled; both compute the same ELBO and gradients up to summation order.

{table}

![SVI step speedup vs sequence length]({figure})

**Reading the table.** At L = {L} the scan guide's step is {r.speedup_scan:.1f}x the per-step
model's, against {r.speedup:.1f}x for the gated guide with the lean loop and
{r.speedup_stepwise:.1f}x with the step-by-step loop. Sampling by the scan (forward and
backward) is {r.scan_share:.0%} of the scan step: what remains is scoring the model's terms for
all positions (the emission's softmax over the vocabulary dominates), which the per-step
model pays too. {"The scan guide's speedup grows with L over the lengths measured." if grows else
"The scan guide's speedup does not grow monotonically with L in this run (noise on a shared machine)."}
Timed alone (sampling and its backward pass), the lean loop is
{(r.guide_loop_share / r.speedup_stepwise) / (r.lean_loop_share / r.speedup):.1f}x faster than
the step-by-step loop and takes {r.lean_loop_share:.0%} of its (shorter) step; below it the cost
is inherent to sampling one step at a time (a few
`(batch, state)`-sized operations per step whose cost is dispatch rather than arithmetic, paid
again in the backward pass). The machine was shared with other jobs, so single repeats are
noisy; interleaving makes the load hit all paths alike.
"""


def run(quick: bool, figure_dir: Path) -> BenchResult:
    setup = SviSpeedSetup()
    if quick:
        lengths, repeats = [64, 256], [3, 3]
    else:
        lengths, repeats = [64, 256, 1024, 4096], [7, 5, 3, 1]
    results = measure(lengths, repeats, setup)
    figure = plot(results, Path(figure_dir) / "svi_speed.png")
    config = asdict(setup) | {"lengths": lengths, "repeats": repeats, "quick": quick,
                               "dtype": "float32", "agreement_dtype": "float64"}
    return BenchResult(
        benchmark=NAME,
        metrics=metrics_of(results),
        config=config,
        markdown=_markdown(results, setup, f"figures/{figure.name}"),
        figures=[figure],
    )
