"""Memory methods behind one small protocol, and the task runners that play them.

A *memory method* reads an unbounded stream with bounded memory. The benchmark compares
methods only through :class:`MemoryMethod` / :class:`MemorySession`, so a further method
(e.g. a VMT reader carrying a latent state plus a window) plugs in by implementing these
five session operations on token ids. :class:`KVMethod` wraps a causal LM with an
:class:`~vmt.memory.cache.EvictionPolicy` (full context, window, StreamingLLM, SirLLM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from vmt.memory.cache import EvictionPolicy
from vmt.memory.decoding import KVStream
from vmt.memory.tasks import (
    LETTERS,
    RPS_INTRO,
    RPS_MOVES,
    RPS_OPTIONS,
    CompletionQuestion,
    DialogueSession,
    GrocerySession,
    PasskeyTrial,
    rps_outcome,
    rps_round_prompt,
)

Tokenize = Callable[[str], list[int]]


class MemorySession(Protocol):
    """One stream read by a memory method."""

    def read_tokens(self, tokens: Sequence[int]) -> None:
        """Read (time,) tokens into memory."""

    def choose_tokens(self, prompt: Sequence[int], options: Sequence[Sequence[int]]) -> int:
        """Read ``prompt``, return the index of the most likely option, keep only that one."""

    def greedy_match(self, answer: Sequence[int]) -> tuple[bool, float]:
        """Whether greedy decoding would produce ``answer`` next, and its log-likelihood."""

    def end_round(self) -> None:
        """End of a dialogue round."""

    def fork(self) -> MemorySession:
        """An independent copy (to ask a probe question without changing the stream)."""


class MemoryMethod(Protocol):
    """A named way of reading streams with a memory budget (``None`` = unbounded)."""

    name: str
    budget: int | None

    def new_session(self) -> MemorySession:
        """A fresh, empty stream."""


class KVSession:
    """:class:`MemorySession` over a :class:`~vmt.memory.decoding.KVStream`."""

    def __init__(self, stream: KVStream) -> None:
        self.stream = stream

    def read_tokens(self, tokens: Sequence[int]) -> None:
        self.stream.feed(torch.as_tensor(list(tokens), dtype=torch.int64))

    def choose_tokens(self, prompt: Sequence[int], options: Sequence[Sequence[int]]) -> int:
        opts = [torch.as_tensor(list(o), dtype=torch.int64) for o in options]
        return self.stream.choose(torch.as_tensor(list(prompt), dtype=torch.int64), opts).index

    def greedy_match(self, answer: Sequence[int]) -> tuple[bool, float]:
        target = torch.as_tensor(list(answer), dtype=torch.int64)
        first = self.stream.next_logprobs
        if first is None:
            raise ValueError("read a context before asking for an answer")
        out = self.stream.feed(target, return_logits=True)
        preds = torch.cat([first.argmax().reshape(1), out.logits[:-1].argmax(-1)])
        return bool((preds == target).all()), float(out.token_logprobs.sum())

    def end_round(self) -> None:
        self.stream.end_round()

    def fork(self) -> KVSession:
        return KVSession(self.stream.fork())


class KVMethod:
    """A causal LM with a KV-cache policy, as a :class:`MemoryMethod`."""

    def __init__(self, name: str, model, policy: EvictionPolicy, chunk_size: int = 128) -> None:
        self.name = name
        self.model = model
        self.policy = policy
        self.budget = policy.budget
        self.chunk_size = chunk_size

    def new_session(self) -> KVSession:
        return KVSession(KVStream(self.model, self.policy, chunk_size=self.chunk_size))


# --------------------------------------------------------------------------- runners
def play_rps(method: MemoryMethod, tokenize: Tokenize, player_moves: Sequence[str]) -> list[int]:
    """Play one game; returns the model's outcome per round (+1 win, 0 tie, -1 loss)."""
    session = method.new_session()
    session.read_tokens(tokenize(RPS_INTRO))
    options = [tokenize(letter) for letter in RPS_OPTIONS]
    outcomes: list[int] = []
    previous: str | None = None
    for move in player_moves:
        prompt = rps_round_prompt(previous)
        if previous is not None:
            prompt = ")\n" + prompt  # closes the model's previous answer
        choice = session.choose_tokens(tokenize(prompt), options)
        outcomes.append(rps_outcome(RPS_MOVES[choice], move))
        session.end_round()
        previous = move
    return outcomes


def _check_marks(checkpoints: Sequence[int], n_max: int) -> list[int]:
    marks = sorted(set(checkpoints))
    if not marks or marks[0] < 0 or marks[-1] > n_max:
        raise ValueError(f"checkpoints must lie in [0, {n_max}], got {list(checkpoints)}")
    return marks


def answer_completion(
    session: MemorySession, tokenize: Tokenize, question: CompletionQuestion
) -> bool:
    """Whether ``session`` picks the right continuation of ``question.prompt``.

    Each continuation is scored by its summed token log-likelihood (``choose_tokens``; no
    length normalisation): the probability of the whole continuation text.
    """
    options = [tokenize(c) for c in question.continuations]
    return session.choose_tokens(tokenize(question.prompt), options) == question.answer


def grocery_recall(
    method: MemoryMethod,
    tokenize: Tokenize,
    session_spec: GrocerySession,
    checkpoints: Sequence[int],
) -> dict[int, bool]:
    """Recall correctness after ``n`` distractor questions, for every ``n`` in ``checkpoints``.

    The distractor questions are read with their right answers (teacher-forced), one round
    each; at each checkpoint a fork of the session is asked the recall question, answered by
    the item name (the candidate names scored as continuations), so one stream serves every
    distance.
    """
    marks = _check_marks(checkpoints, len(session_spec.distractors))
    session = method.new_session()
    session.read_tokens(tokenize(session_spec.instruction))
    session.end_round()
    results: dict[int, bool] = {}
    done = 0
    for mark in marks:
        for q in session_spec.distractors[done:mark]:
            session.read_tokens(tokenize(q.prompt + LETTERS[q.answer] + ")\n"))
            session.end_round()
        done = mark
        results[mark] = answer_completion(session.fork(), tokenize, session_spec.recall)
    return results


def dialogue_selection(
    method: MemoryMethod,
    tokenize: Tokenize,
    session_spec: DialogueSession,
    checkpoints: Sequence[int],
) -> dict[int, list[bool]]:
    """Response-selection correctness per probe after ``n`` small-talk turns, per checkpoint.

    The opening turns (the facts) and the small talk are read one turn per round
    (``end_round`` after each). At each checkpoint every probe is asked on its own fork of
    the stream, so one stream serves every distance and the probes do not see each other.

    Returns:
        ``{n: [correct of probe 0, probe 1, ...]}`` (probes in the order of ``facts``).
    """
    marks = _check_marks(checkpoints, len(session_spec.small_talk))
    session = method.new_session()
    for turn in session_spec.opening:
        session.read_tokens(tokenize(turn))
        session.end_round()
    results: dict[int, list[bool]] = {}
    done = 0
    for mark in marks:
        for turn in session_spec.small_talk[done:mark]:
            session.read_tokens(tokenize(turn))
            session.end_round()
        done = mark
        results[mark] = [
            answer_completion(session.fork(), tokenize, probe) for probe in session_spec.probes
        ]
    return results


def passkey_result(method: MemoryMethod, trial: PasskeyTrial) -> tuple[bool, float]:
    """(exact match of the key under greedy decoding, log-likelihood of the key)."""
    session = method.new_session()
    session.read_tokens(trial.context)
    return session.greedy_match(trial.answer)


def bootstrap_mean_ci(
    values, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean of (n,) values."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty (n,) array, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(lo), float(hi)
