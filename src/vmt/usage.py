"""Using a fitted text run from its folder: the pipeline behind ``vmt sample``, ``vmt read``
and ``vmt chat``.

A run folder written by ``vmt fit`` or ``vmt demo`` holds ``checkpoint/`` and, when the
reverse parts were trained, ``checkpoint-with-reverse/`` (the same forward model plus the
reverse transition and guide). :func:`load_run` rebuilds from it alone the model, the
tokenizer, the compact emission vocabulary and the guide's reader (the frozen LM's reversed
reading, or the VMT's own reader). Then

* :func:`sample_text` writes a continuation of a prompt, a prequel of it, or unconditional
  text;
* :func:`read_text` reads a text with the state carried across windows (its single-sample
  negative ELBO per token), draws posterior state paths and exports them as an ArviZ
  ``DataTree`` to netCDF, with a summary and the trajectory plot;
* :class:`ChatSession` is the writing loop: each turn is read with the guide from the
  carried state and answered by the model; the state can be saved and loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from vmt.inference.generation import (
    Conversation,
    SamplingConfig,
    sample_unconditional,
    write,
    write_prequel,
)
from vmt.inference.reading import FeatureFn, ReadConfig, read

logger = logging.getLogger(__name__)

STATE_FORMAT = "vmt-chat-state-1"


@dataclass
class FittedRun:
    """A fitted text run, loaded for use.

    Attributes:
        vmt: the model (eval mode).
        tokenizer: the pretrained LM's tokenizer.
        vocabulary: the compact emission vocabulary (:class:`~vmt.data.vocab.Vocabulary`).
        feature_fn: guide features of a window of emission ids (``None``: the VMT's reader).
        unk_id: the LM id shown for ``<unk>`` when decoding.
        window: the encoder's window, the default reading window.
        checkpoint: the checkpoint folder it was loaded from.
        fingerprint: identifies the model (config and vocabulary) in saved chat states.
    """

    vmt: torch.nn.Module
    tokenizer: object
    vocabulary: object
    feature_fn: FeatureFn | None
    unk_id: int
    window: int
    checkpoint: Path
    fingerprint: str

    @property
    def has_reverse(self) -> bool:
        return bool(self.vmt.config.reverse)

    def lm_ids(self, text: str) -> torch.Tensor:
        """``(time,)`` the tokenizer's ids of ``text`` (no special tokens)."""
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)

    def encode(self, text: str) -> torch.Tensor:
        """``(time,)`` emission ids of ``text``; ``ValueError`` if it has no tokens."""
        ids = self.lm_ids(text)
        if ids.numel() == 0:
            raise ValueError(f"the text {text[:40]!r} has no tokens")
        return self.vocabulary.encode(ids)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of emission ids ``(time,)``."""
        return self.tokenizer.decode(self.vocabulary.decode(ids, unk_id=self.unk_id).tolist())


def _checkpoint_folder(run_dir: Path, reverse: bool) -> Path:
    if not run_dir.exists():
        raise FileNotFoundError(f"no run folder {run_dir}")
    if (run_dir / "checkpoint.json").is_file():  # a checkpoint folder itself
        return run_dir
    with_reverse = run_dir / "checkpoint-with-reverse"
    if (with_reverse / "checkpoint.json").is_file():
        return with_reverse
    if reverse:
        raise ValueError(
            f"run {run_dir} has no trained reverse parts (no checkpoint-with-reverse/): fit it with "
            "a preset with \"reverse\": true and a schedule with reverse_steps > 0"
        )
    forward = run_dir / "checkpoint"
    if (forward / "checkpoint.json").is_file():
        return forward
    raise FileNotFoundError(f"{run_dir} is not a vmt run (no checkpoint/ inside)")


def load_run(run_dir: str | Path, reverse: bool = False) -> FittedRun:
    """Rebuild a run written by ``vmt fit`` / ``vmt demo`` for use.

    Prefers ``checkpoint-with-reverse/`` when present (its forward parts are the fitted
    ones, kept frozen while the reverse parts trained). With ``reverse`` a run without trained
    reverse parts is refused with a ``ValueError``.
    """
    from vmt.checkpoint import load_checkpoint
    from vmt.data.corpus import tokenizer_vocab_size
    from vmt.data.vocab import Vocabulary
    from vmt.experiment import ModelPreset, lm_reading_features, unknown_token_id

    folder = _checkpoint_folder(Path(run_dir), reverse)
    ckpt = load_checkpoint(folder)
    meta = ckpt.meta
    missing = [key for key in ("preset", "vocabulary") if key not in meta]
    if missing:
        raise ValueError(f"checkpoint {folder} was not written by `vmt fit` (no {', '.join(missing)}); "
                         "use it from Python")
    vmt = ckpt.vmt.eval()
    if reverse and not vmt.config.reverse:
        raise ValueError(f"checkpoint {folder} has no reverse parts (its config has reverse=false)")
    preset = ModelPreset.from_dict(meta["preset"])
    enc = preset.encoder
    if enc.kind == "lm":
        from vmt.encoders.pretrained import load_pretrained_lm

        lm, tokenizer = load_pretrained_lm(enc.name)
    else:
        from vmt.data.cli import load_tokenizer

        lm, tokenizer = None, load_tokenizer(enc.name)
    vocab = Vocabulary(tuple(meta["vocabulary"]), tokenizer_vocab_size(tokenizer))
    if vocab.size != vmt.config.obs_dim:
        raise ValueError(f"checkpoint {folder}: vocabulary of {vocab.size} ids for an emission of {vmt.config.obs_dim}")
    feature_fn, _ = lm_reading_features(enc, lm, tokenizer, vocab)
    fingerprint = hashlib.sha256(
        json.dumps([meta["vmt_config"], meta["vocabulary"]], sort_keys=True).encode()
    ).hexdigest()[:16]
    return FittedRun(vmt, tokenizer, vocab, feature_fn, unknown_token_id(tokenizer), enc.window, folder,
                     fingerprint)


def _check_tokens(num_tokens: int) -> None:
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"the number of tokens to write must be a positive integer, got {num_tokens!r}")


def sample_text(run: FittedRun, prompt: str | None = None, *, num_tokens: int = 40, reverse: bool = False,
                sampling: SamplingConfig | None = None, samples: int = 1, seed: int = 0,
                progress: bool = False) -> list[str]:
    """Write ``samples`` texts of ``num_tokens`` tokens.

    With a ``prompt``: read it (state carried across windows) and continue from its last
    state, or with ``reverse`` write what comes *before* it from the state of its first token
    (in reading order). Without: unconditional text from the prior (``reverse``: a text's
    ending, written backward).
    """
    _check_tokens(num_tokens)
    if reverse and not run.has_reverse:
        raise ValueError(f"checkpoint {run.checkpoint} has no reverse parts")
    vmt, sampling = run.vmt, sampling or SamplingConfig()
    torch.manual_seed(seed)
    if prompt is None:
        written = sample_unconditional(vmt, num_tokens, samples, sampling,
                                       direction="reverse" if reverse else "forward")
    else:
        ids = run.encode(prompt)
        res = read(vmt, ids, ReadConfig(window=run.window, keep_path=reverse), run.feature_fn,
                   samples=samples, progress=progress)
        if reverse:
            written = write_prequel(vmt, res.path[:, 0], num_tokens, sampling)
        else:
            written = write(vmt, res.state, num_tokens, sampling)
    return [run.decode(tokens) for tokens in written.tokens]


@dataclass
class ReadReport:
    """What :func:`read_text` read and wrote.

    Attributes:
        tokens_read, windows, neg_elbo_per_token: the carried-state read of the whole text
            (single-sample negative ELBO per token, compact vocabulary).
        paths: chains x draws of the exported posterior.
        positions: positions exported (the first ``max_tokens`` of the text).
        state_sd: ``(state,)`` posterior sd of each state dimension, averaged over positions.
        last_mean, last_sd: ``(state,)`` posterior mean and sd at the last exported position.
        r_hat_max, ess_bulk_min: over every (position, state) of the export.
        netcdf, plot: the files written.
    """

    tokens_read: int
    windows: int
    neg_elbo_per_token: float
    chains: int
    draws: int
    positions: int
    state_sd: np.ndarray
    last_mean: np.ndarray
    last_sd: np.ndarray
    r_hat_max: float
    ess_bulk_min: float
    netcdf: Path
    plot: Path
    tree: object = field(repr=False, default=None)


def netcdf_engine() -> str:
    """An installed engine that writes groups (an ArviZ ``DataTree``) to netCDF-4."""
    if importlib.util.find_spec("h5netcdf") is not None and importlib.util.find_spec("h5py") is not None:
        return "h5netcdf"
    if importlib.util.find_spec("netCDF4") is not None:
        return "netcdf4"
    raise ValueError("writing posterior states to netCDF needs h5netcdf (with h5py) or netCDF4 installed")


def read_text(run: FittedRun, text: str, *, out: str | Path = "posterior.nc", plot: str | Path | None = None,
              window: int | None = None, chains: int = 2, draws: int = 50, max_tokens: int | None = None,
              seed: int = 0, progress: bool = False) -> ReadReport:
    """Read ``text`` into posterior states and export them.

    The whole text is read once with the state carried across windows (its single-sample
    negative ELBO per token is reported); then ``chains x draws`` posterior paths of its first
    ``max_tokens`` tokens (all by default) are drawn with
    :func:`~vmt.inference.posterior.posterior_states` and written to ``out`` (netCDF-4, groups
    ``posterior``, ``log_likelihood``, ``posterior_predictive``, ``observed_data``; the
    ``token`` coordinate holds the decoded tokens), with the trajectory plot at ``plot``
    (default: ``<out stem>_trajectory.png`` beside ``out``).
    """
    from vmt.inference.posterior import mean_sd, plot_trajectories, posterior_states, summarize

    engine = netcdf_engine()
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens}")
    config = ReadConfig(window=window or run.window)
    lm_ids = run.lm_ids(text)
    if lm_ids.numel() == 0:
        raise ValueError("the text has no tokens")
    ids = run.vocabulary.encode(lm_ids)
    torch.manual_seed(seed)
    res = read(run.vmt, ids, config, run.feature_fn, progress=progress)
    keep = ids[:max_tokens] if max_tokens is not None else ids
    labels = [run.tokenizer.decode([int(t)]) for t in lm_ids[: keep.shape[0]]]
    tree = posterior_states(run.vmt, keep, chains=chains, draws=draws, window=config.window,
                            feature_fn=run.feature_fn, labels=labels, seed=seed, progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tree.to_netcdf(out, engine=engine)
    plot = Path(plot) if plot is not None else out.with_name(f"{out.stem}_trajectory.png")
    states = list(range(min(3, run.vmt.config.state_dim)))
    plot_trajectories(tree, plot, states=states)
    mean, sd = mean_sd(tree)
    table = summarize(tree)
    return ReadReport(
        tokens_read=res.tokens_read, windows=res.windows, neg_elbo_per_token=res.neg_elbo_per_token(),
        chains=chains, draws=draws, positions=keep.shape[0], state_sd=sd.mean(0), last_mean=mean[-1],
        last_sd=sd[-1], r_hat_max=float(table["r_hat"].max()), ess_bulk_min=float(table["ess_bulk"].min()),
        netcdf=out, plot=plot, tree=tree,
    )


class ChatSession:
    """The writing loop of a fitted run: read a turn with the guide, reply with the model.

    Only the latent state ``(1, state)`` is carried between turns (see
    :class:`~vmt.inference.generation.Conversation`); :meth:`save_state` and
    :meth:`load_state` keep it across sessions.

    Args:
        run: the fitted run.
        reply_tokens: tokens written per reply.
        sampling: how reply tokens are drawn.
        window: reading window (default: the run's encoder window).
    """

    def __init__(self, run: FittedRun, *, reply_tokens: int = 40, sampling: SamplingConfig | None = None,
                 window: int | None = None):
        _check_tokens(reply_tokens)
        self.run = run
        self.reply_tokens = reply_tokens
        self.conversation = Conversation(run.vmt, run.feature_fn, ReadConfig(window=window or run.window),
                                         sampling)

    @property
    def turns(self) -> int:
        return self.conversation.turns

    def turn(self, text: str) -> str:
        """Read ``text`` from the carried state and return the reply."""
        self.conversation.hear(self.run.encode(text))
        return self.run.decode(self.conversation.reply(self.reply_tokens)[0])

    def save_state(self, path: str | Path) -> Path:
        """Write the carried state (safetensors, with the run's fingerprint)."""
        from safetensors.torch import save_file

        conv = self.conversation
        if conv.state is None:
            raise ValueError("nothing has been read yet: there is no state to save")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"state": conv.state.contiguous()}, str(path), metadata={
            "format": STATE_FORMAT, "run": self.run.fingerprint, "turns": str(conv.turns),
            "tokens_seen": str(conv.tokens_seen),
        })
        return path

    def load_state(self, path: str | Path) -> None:
        """Continue from a state saved by :meth:`save_state` for the same model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no state file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = f.get_tensor("state") if "state" in f.keys() else None
        except (SafetensorError, OSError) as err:
            raise ValueError(f"state file {path} is not readable: {err}") from err
        if meta.get("format") != STATE_FORMAT or state is None:
            raise ValueError(f"{path} is not a chat state file")
        if meta.get("run") != self.run.fingerprint:
            raise ValueError(f"state file {path} was saved by another model (run fingerprint "
                             f"{meta.get('run')}, this run {self.run.fingerprint})")
        d = self.run.vmt.config.state_dim
        if state.dim() != 2 or state.shape[-1] != d:
            raise ValueError(f"state in {path} has shape {tuple(state.shape)}, expected (samples, {d})")
        conv = self.conversation
        conv.state = state.to(next(self.run.vmt.parameters()).dtype)
        conv.samples = state.shape[0]
        conv.turns = int(meta.get("turns", 0))
        conv.tokens_seen = int(meta.get("tokens_seen", 0))


def chat(session: ChatSession, lines: Iterable[str], out: TextIO, prompt: str = "") -> int:
    """Answer each non-blank line of ``lines`` on ``out``, one reply per line (newlines in a
    reply are shown as spaces); ``prompt`` is written before each turn. Returns the number of
    turns answered."""
    answered = 0
    if prompt:
        out.write(prompt)
        out.flush()
    for line in lines:
        if line.strip():
            reply = session.turn(line)
            out.write(reply.replace("\n", " ").strip() + "\n")
            answered += 1
        if prompt:
            out.write(prompt)
        out.flush()
    return answered
