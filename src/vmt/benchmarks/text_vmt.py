"""The text VMTs that benchmarks share.

* :func:`fitted_text_vmt`: the ``text-token`` preset (token family; its guide reads frozen
  SmolLM2-135M features for fresh starts) fitted with the ``token-hour`` schedule (the whole
  pydoc training split, distillation from SmolLM2, about 15 CPU-minutes).
* :func:`fitted_task_vmt`: the ``task-token`` preset (the same model, a GRU reader trained
  with it) fitted with the ``task-hour`` schedule on the memory tasks' training streams
  (:mod:`vmt.memory.task_corpus`: the task generators with training seeds, answers written
  in), for the ``memory-tasks`` row of a VMT that has seen the tasks' formats.

Each is fitted once per mode and kept under ``runs/bench/<name>/{quick,full}``; later calls
resume from the finished checkpoint instead of training again. The quick mode trains for a
few dozen steps on a few thousand tokens only (a smoke run, not a model to read numbers from).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from vmt.memory.task_corpus import TaskCorpusConfig

logger = logging.getLogger(__name__)

PRESET = "text-token"
SCHEDULE = "token-hour"
TASK_PRESET = "task-token"
TASK_SCHEDULE = "task-hour"
#: The task VMT's training streams: grocery-heavy, short sessions answered often, so the
#: (emphasised, see the ``task-hour`` schedule) copy of the item has many examples.
TASK_CORPUS = TaskCorpusConfig(grocery_sessions=3000, grocery_max_distractors=6, grocery_recall_rates=(0.5, 1.0),
                               dialogue_sessions=100, rps_games=6, passkey_trials=5)
QUICK_STEPS = 40
QUICK_TRAIN_TOKENS = 4000


def _fitted(preset_name: str, schedule_name: str, quick: bool, out_root: Path,
            texts: list[str] | None = None, corpus_name: str = "pydoc"):
    from vmt import experiment

    preset = experiment.ModelPreset.from_dict(
        experiment.load_json(experiment.resolve_config(preset_name, "models"))
    )
    schedule = experiment.Schedule.from_dict(
        experiment.load_json(experiment.resolve_config(schedule_name, "inference"))
    )
    if quick:
        train = replace(schedule.train, steps=QUICK_STEPS, annealing_steps=QUICK_STEPS // 2,
                        checkpoint_every=QUICK_STEPS, lr_decay_steps=QUICK_STEPS)
        schedule = replace(schedule, train=train, max_train_tokens=QUICK_TRAIN_TOKENS,
                           max_test_tokens=500)
    out = out_root / ("quick" if quick else "full")
    logger.info("text VMT (%s, %s schedule, %d steps) in %s", preset_name, schedule_name,
                schedule.train.steps, out)
    return experiment.run_text(preset, schedule, out, texts=texts, corpus_name=corpus_name, progress=False)


def fitted_text_vmt(quick: bool, root: str | Path = "runs/bench/text-vmt"):
    """A :class:`vmt.experiment.RunResult` of the shared text VMT (fitted or resumed)."""
    return _fitted(PRESET, SCHEDULE, quick, Path(root))


def fitted_task_vmt(quick: bool, root: str | Path = "runs/bench/task-vmt"):
    """A :class:`vmt.experiment.RunResult` of the VMT fitted on the memory tasks' training
    streams (fitted or resumed; quick: a few streams of each task)."""
    from vmt.memory.task_corpus import task_training_texts

    corpus = TASK_CORPUS
    if quick:
        corpus = TaskCorpusConfig(grocery_sessions=6, dialogue_sessions=3, rps_games=3, rps_rounds=10,
                                  passkey_trials=1, passkey_chars=(500, 800))
    return _fitted(TASK_PRESET, TASK_SCHEDULE, quick, Path(root), task_training_texts(corpus), "memory-tasks")


class TextVMTMethods:
    """A ``memory-tasks`` method factory ``(model, tokenizer, budget, task) -> MemoryMethod``:
    a fitted text VMT (``fit(quick) -> RunResult``, default the shared text VMT) reading with a
    window equal to the budget and its state carried.

    The model is fitted (or resumed) on first use; set :attr:`quick` before that to use the
    quick model. ``model`` and ``tokenizer`` are not needed: the run has its own copy of the LM.
    """

    def __init__(self, samples: int = 16, fit=fitted_text_vmt) -> None:
        self.samples = samples
        self.fit = fit
        self.quick = False
        self._fitted: dict[bool, object] = {}

    def __call__(self, model, tokenizer, budget: int, task: str):
        from vmt.memory.vmt_method import VMTMethod

        return VMTMethod.from_run(self._result(), window=budget, samples=self.samples)

    def _result(self):
        if self.quick not in self._fitted:
            self._fitted[self.quick] = self.fit(self.quick)
        return self._fitted[self.quick]

    def summary(self) -> dict:
        """The fitted model's held-out diagnostics on its own split, beside the split's
        unigram, bigram and pretrained-LM NLL (nats/token over the LM's vocabulary)."""
        from vmt.experiment import split_baselines

        result = self._result()
        test, base = result.test, split_baselines(result.text_run)
        return {
            "corpus": result.text_run.train_corpus.name, "train_tokens": result.text_run.train_corpus.num_tokens,
            "steps": result.train.steps, "test_tokens": test.tokens,
            "neg_elbo": test.neg_elbo_per_token, "neg_iwae": test.neg_iwae_per_token,
            "particles": test.particles, "kl": test.kl_per_token, "oov": test.oov_per_token,
            "explained_dims": test.explained_dims, "state_dim": result.model.config.state_dim,
            "first_guide": result.model.config.first_guide,
            "emphasis": result.text_run.schedule.train.emphasis,
            "emphasis_cue": result.text_run.schedule.emphasis_cue,
            "unigram": base.unigram, "bigram": base.bigram, "lm": base.lm_document,
        }
