"""Training text in the memory tasks' formats: the generators of :mod:`vmt.memory.tasks`
with training seeds, written out as whole streams with their answers.

A model that is to answer the tasks from a carried state must first see them. Every document
here is one stream as a memory method reads it (the same intro, prompts and separators as
the task runners of :mod:`vmt.memory.methods`), with the right answers written in:

* **grocery**: the instruction, ``N`` distractor questions with their answers, and the recall
  question answered with the item; the recall is also asked (and answered) after each
  distractor with a probability drawn per stream, so that keeping the item pays at every
  distance, not only at the end (streams with a low rate hold it long, streams with a high
  rate give many answers to learn the copy from).
* **dialogue**: the facts, ``N`` small-talk turns, and every probe answered with the response
  that names the stated value; probes are also asked between turns, with a probability drawn
  per stream.
* **rock-paper-scissors**: a game against a player with the task's 50/30/20 preference; the
  assistant plays the move that beats the player's most frequent move so far (the best fixed
  strategy, learned from the revealed moves).
* **passkey**: filler prose with the key stated at a random depth, the question and the key.

Seeds start at :attr:`TaskCorpusConfig.seed`, far above the seeds the ``memory-tasks``
benchmark draws its test sessions from (below 1,000), so no test session is a training one.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

from vmt.memory.tasks import (
    LETTERS,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    RPS_COUNTER,
    RPS_INTRO,
    RPS_MOVES,
    RPS_OPTIONS,
    CompletionQuestion,
    dialogue_session,
    grocery_session,
    natural_filler,
    rps_player_moves,
    rps_round_prompt,
)


@dataclass(frozen=True)
class TaskCorpusConfig:
    """How many training streams of each task, and how long.

    Attributes:
        grocery_sessions: grocery streams, each with ``0..grocery_max_distractors`` questions.
        grocery_recall_rates: (low, high): each stream's probability of an (answered) recall
            after each distractor is drawn uniformly from this range.
        dialogue_sessions: dialogue streams, each with ``0..dialogue_max_turns`` turns.
        dialogue_probe_rates: (low, high) of each stream's probability of an (answered)
            probe after each small-talk turn.
        dialogue_candidates: candidate responses drawn per probe (only the right one is written).
        rps_games: rock-paper-scissors games of ``rps_rounds`` rounds, favourites in turn.
        passkey_trials: passkey streams of ``passkey_chars`` (low, high) filler characters.
        seed: the first training seed (every stream has its own seed from here on).
    """

    grocery_sessions: int = 1000
    grocery_max_distractors: int = 30
    grocery_recall_rates: tuple[float, float] = (0.0, 0.6)
    dialogue_sessions: int = 300
    dialogue_max_turns: int = 45
    dialogue_probe_rates: tuple[float, float] = (0.0, 0.4)
    dialogue_candidates: int = 4
    rps_games: int = 12
    rps_rounds: int = 60
    passkey_trials: int = 20
    passkey_chars: tuple[int, int] = (1000, 8000)
    seed: int = 10_000

    def __post_init__(self) -> None:
        for name in ("grocery_sessions", "grocery_max_distractors", "dialogue_sessions", "dialogue_max_turns",
                     "rps_games", "rps_rounds", "passkey_trials"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("grocery_recall_rates", "dialogue_probe_rates"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= 1, got {(low, high)}")
        low, high = self.passkey_chars
        if not 1 <= low <= high:
            raise ValueError(f"passkey_chars must be (low, high) with 1 <= low <= high, got {self.passkey_chars}")
        if self.seed < 1000:
            raise ValueError(f"seed must be >= 1000 (the benchmark's test sessions use seeds below), got {self.seed}")


def _answered(question: CompletionQuestion) -> str:
    return question.prompt + question.continuations[question.answer] + "\n"


def grocery_stream(n_distractors: int, seed: int, recall_rate: float) -> str:
    """One grocery session as read by the task runner, the recall answered at the end and,
    with probability ``recall_rate``, after each distractor."""
    spec = grocery_session(n_distractors, seed)
    rng = random.Random(f"{seed}:recalls")
    recall = _answered(spec.recall)
    parts = [spec.instruction]
    for q in spec.distractors:
        parts.append(q.prompt + LETTERS[q.answer] + ")\n")
        if rng.random() < recall_rate:
            parts.append(recall)
    parts.append(recall)
    return "".join(parts)


def dialogue_stream(n_turns: int, seed: int, probe_rate: float, n_candidates: int = 4) -> str:
    """One dialogue session: the facts, the small talk with answered probes between turns
    (probability ``probe_rate`` each), then every probe answered, in a random order."""
    spec = dialogue_session(n_turns, seed, n_candidates)
    rng = random.Random(f"{seed}:probes")
    answered = [_answered(p) for p in spec.probes]
    parts = list(spec.opening)
    for turn in spec.small_talk:
        parts.append(turn)
        if rng.random() < probe_rate:
            parts.append(rng.choice(answered))
    rng.shuffle(answered)
    return "".join(parts + answered)


def rps_stream(n_rounds: int, favourite: str, seed: int) -> str:
    """One rock-paper-scissors game; the assistant beats the player's most frequent move so
    far (a random move before any is seen; ties broken at random)."""
    moves = rps_player_moves(n_rounds, favourite, seed)
    rng = random.Random(f"{seed}:assistant")
    seen: Counter[str] = Counter()
    parts, previous = [RPS_INTRO], None
    for move in moves:
        if seen:
            top = max(seen.values())
            mine = RPS_COUNTER[rng.choice(sorted(m for m, c in seen.items() if c == top))]
        else:
            mine = rng.choice(RPS_MOVES)
        parts.append(rps_round_prompt(previous) + RPS_OPTIONS[RPS_MOVES.index(mine)] + ")\n")
        seen[move] += 1
        previous = move
    return "".join(parts)


def passkey_stream(n_chars: int, seed: int) -> str:
    """A passkey stream: ``n_chars`` filler characters with the key at a random depth, the
    question and the key."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    cut = round(rng.random() * n_chars)
    filler = natural_filler(n_chars, seed)
    return (PASSKEY_INTRO + filler[:cut] + PASSKEY_NEEDLE.format(key=key) + filler[cut:]
            + PASSKEY_QUESTION + f" {key}\n")


def task_training_texts(config: TaskCorpusConfig | None = None) -> list[str]:
    """Every training stream of ``config`` (grocery, dialogue, RPS, passkey), one per document."""
    c = config or TaskCorpusConfig()
    rng = random.Random(c.seed)
    seed = itertools.count(c.seed + 1)  # every stream its own seed
    texts = [grocery_stream(rng.randint(0, c.grocery_max_distractors), next(seed),
                            rng.uniform(*c.grocery_recall_rates)) for _ in range(c.grocery_sessions)]
    texts += [dialogue_stream(rng.randint(0, c.dialogue_max_turns), next(seed), rng.uniform(*c.dialogue_probe_rates),
                              c.dialogue_candidates) for _ in range(c.dialogue_sessions)]
    texts += [rps_stream(c.rps_rounds, RPS_MOVES[g % 3], next(seed)) for g in range(c.rps_games)]
    texts += [passkey_stream(rng.randint(*c.passkey_chars), next(seed)) for _ in range(c.passkey_trials)]
    return texts
