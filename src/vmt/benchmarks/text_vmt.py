"""The text VMT that benchmarks share: the ``text-token`` preset (token family; its guide
reads frozen SmolLM2-135M features for fresh starts) fitted with the ``token-hour`` schedule
(the whole pydoc training split, distillation from SmolLM2, about 15 CPU-minutes).

It is fitted once per mode and kept under ``runs/bench/text-vmt/{quick,full}``; later calls
resume from the finished checkpoint instead of training again. The quick mode trains for a
few dozen steps on a few thousand tokens only (a smoke run, not a model to read numbers from).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

logger = logging.getLogger(__name__)

PRESET = "text-token"
SCHEDULE = "token-hour"
QUICK_STEPS = 40
QUICK_TRAIN_TOKENS = 4000


def fitted_text_vmt(quick: bool, root: str | Path = "runs/bench/text-vmt"):
    """A :class:`vmt.experiment.RunResult` of the shared text VMT (fitted or resumed)."""
    from vmt import experiment

    preset = experiment.ModelPreset.from_dict(
        experiment.load_json(experiment.resolve_config(PRESET, "models"))
    )
    schedule = experiment.Schedule.from_dict(
        experiment.load_json(experiment.resolve_config(SCHEDULE, "inference"))
    )
    if quick:
        train = replace(schedule.train, steps=QUICK_STEPS, annealing_steps=QUICK_STEPS // 2,
                        checkpoint_every=QUICK_STEPS, lr_decay_steps=QUICK_STEPS)
        schedule = replace(schedule, train=train, max_train_tokens=QUICK_TRAIN_TOKENS,
                           max_test_tokens=500)
    out = Path(root) / ("quick" if quick else "full")
    logger.info("text VMT (%s, %s schedule, %d steps) in %s", PRESET, SCHEDULE,
                schedule.train.steps, out)
    return experiment.run_text(preset, schedule, out, progress=False)


class TextVMTMethods:
    """A ``memory-tasks`` method factory ``(model, tokenizer, budget, task) -> MemoryMethod``:
    the shared text VMT reading with a window equal to the budget and its state carried.

    The model is fitted (or resumed) on first use; set :attr:`quick` before that to use the
    quick model. ``model`` and ``tokenizer`` are not needed: the run has its own copy of the LM.
    """

    def __init__(self, samples: int = 16) -> None:
        self.samples = samples
        self.quick = False
        self._fitted: dict[bool, object] = {}

    def __call__(self, model, tokenizer, budget: int, task: str):
        from vmt.memory.vmt_method import VMTMethod

        if self.quick not in self._fitted:
            self._fitted[self.quick] = fitted_text_vmt(self.quick)
        return VMTMethod.from_run(self._fitted[self.quick], window=budget, samples=self.samples)
