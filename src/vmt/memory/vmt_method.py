"""A fitted VMT as a memory method: a bounded reading window plus a carried latent state.

The stream is read with :func:`vmt.inference.reading.read` from the carried state (the
guide looks at most ``window`` tokens ahead; nothing else is kept), and questions are
answered by the *model*, not the reader: the probability of an option given everything read
is the VMT's predictive ``p(option | x_n)``, estimated by the particle filter of
:func:`vmt.inference.predictive.filter_continuation` over the ``samples`` rows of the state.

Its memory is ``samples x state`` numbers plus the reader's window (a frozen LM reads at most
``window`` tokens at a time), against a KV cache of ``budget`` tokens for the LM baselines; the
benchmark gives the VMT a window equal to the budget.

Tokens arrive as the LM's ids; the VMT observes them through its compact
:class:`~vmt.data.vocab.Vocabulary` (``<unk>``'s probability spread over the ids it merges)
while the reader sees the LM ids themselves. Tokens are buffered and read in one go when the
state is needed (or when a window's worth has accumulated), so a prompt and the answer before
it share one reader call and its look-ahead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vmt.inference.predictive import filter_continuation
from vmt.inference.reading import FeatureFn, ReadConfig, read


class VMTMethod:
    """A fitted text VMT as a :class:`~vmt.memory.methods.MemoryMethod`.

    Args:
        name: label in tables.
        vmt: the fitted model (categorical emission over ``vocabulary``).
        vocabulary: the model's :class:`~vmt.data.vocab.Vocabulary` (LM ids -> emission ids).
        feature_fn: the guide's features of a window of LM ids (e.g. a reversed
            :class:`~vmt.encoders.features.LMFeatureExtractor`); ``None``: the VMT's own
            trained reader reads the emission ids.
        window: tokens the reader encodes at once (the memory budget).
        samples: rows of the carried state (particles of the predictive).
    """

    def __init__(self, name: str, vmt, vocabulary, feature_fn: FeatureFn | None, window: int,
                 samples: int = 16) -> None:
        if not vmt.config.emits_tokens:
            raise ValueError(f"a memory method needs a categorical emission, got {vmt.config.emission!r}")
        if vocabulary.size != vmt.config.obs_dim:
            raise ValueError(
                f"the vocabulary has {vocabulary.size} emission ids but the model {vmt.config.obs_dim}"
            )
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.name = name
        self.vmt = vmt
        self.vocabulary = vocabulary
        self.feature_fn = feature_fn
        self.read_config = ReadConfig(window=window, score=False)
        self.budget = window
        self.samples = samples
        self.penalty = vocabulary.token_penalty.to(next(vmt.parameters()).dtype)

    @classmethod
    def from_run(cls, result, window: int, samples: int = 16, name: str = "VMT") -> VMTMethod:
        """The model of a text run (:func:`vmt.experiment.run_text`): a guide that reads a
        frozen LM reads each window in reverse with that LM at the preset's layer; a trained
        reader reads the emission ids itself."""
        run = result.text_run
        enc = run.preset.encoder
        feature_fn = None
        if enc.kind == "lm":  # the LM reads its own ids, tokens merged into <unk> included
            from vmt.encoders.features import LMFeatureExtractor

            feature_fn = LMFeatureExtractor(run.lm, layer=enc.layer, direction="reverse", model_name=enc.name)
        result.model.eval()
        return cls(name, result.model, result.vocabulary, feature_fn, window, samples)

    @property
    def state_shape(self) -> tuple[int, int]:
        """``(samples, state)``: what a session carries between reads."""
        return (self.samples, self.vmt.config.state_dim)

    def new_session(self) -> VMTSession:
        return VMTSession(self)


class VMTSession:
    """One stream read by a :class:`VMTMethod`: the carried state and unread tokens."""

    def __init__(self, method: VMTMethod, state: torch.Tensor | None = None,
                 pending: Sequence[int] = ()) -> None:
        self.method = method
        self.state = state
        self.pending: list[int] = list(pending)

    def _flush(self) -> torch.Tensor:
        m = self.method
        if self.pending:
            ids = torch.tensor(self.pending, dtype=torch.long)
            res = read(m.vmt, m.vocabulary.encode(ids), m.read_config, m.feature_fn,
                       samples=m.samples, x0=self.state,
                       feature_tokens=ids if m.feature_fn is not None else None)
            self.state, self.pending = res.state, []
        if self.state is None:
            raise ValueError("read a context before asking for an answer")
        return self.state

    def read_tokens(self, tokens: Sequence[int]) -> None:
        """Read (time,) LM token ids (buffered up to one window)."""
        self.pending += [int(t) for t in tokens]
        if len(self.pending) >= self.method.budget:
            self._flush()

    def _score(self, tokens: Sequence[int]):
        m = self.method
        ids = m.vocabulary.encode(torch.as_tensor(list(tokens), dtype=torch.long))
        return ids, filter_continuation(m.vmt, self._flush(), ids, token_penalty=m.penalty)

    def choose_tokens(self, prompt: Sequence[int], options: Sequence[Sequence[int]]) -> int:
        """Read ``prompt``; the option of highest ``p(option | state)`` is read and returned."""
        if not options or any(len(o) == 0 for o in options):
            raise ValueError("every option needs at least one token")
        self.read_tokens(prompt)
        scores = [self._score(o)[1].log_prob for o in options]
        best = max(range(len(options)), key=scores.__getitem__)
        self.read_tokens(options[best])
        return best

    def greedy_match(self, answer: Sequence[int]) -> tuple[bool, float]:
        """Whether greedy decoding from the state writes ``answer``, and its log-probability.

        An answer token the vocabulary merges into ``<unk>`` can never be written greedily.
        """
        if len(answer) == 0:
            raise ValueError("the answer needs at least one token")
        ids, scored = self._score(answer)
        match = bool((scored.greedy == ids).all()) and bool((ids != 0).all())
        self.read_tokens(answer)
        return match, scored.log_prob

    def end_round(self) -> None:
        """Nothing to do: the state carries everything between rounds."""

    def fork(self) -> VMTSession:
        return VMTSession(self.method, self.state, self.pending)
