"""A long-range probe: does the read state still know a key placed far back?

Documents are ``key=D;`` + filler + ``?key=D`` with a digit ``D`` and filler of natural text
(``pydoc`` topics, characters). A small character-level VMT is fitted on such documents with
short fillers (0 to 48 characters), then probed at distances ``d`` in {64, 256, 1024, 4096},
plus ``d = 16`` inside the training range as a control (quick: {16, 64}). The probe document
stops just before the answer (``...?key=``); its state is read

* **carried**: the whole prefix read with a 256-token window and the state carried;
* **window only**: only the last 256 characters read (what a reader truncated to its window
  sees; the same as carried while the whole document fits in the window);
* **state memory**: the whole prefix read through :class:`~vmt.inference.state_memory.MemoryReader`
  (states stored every 64 tokens, recalled at cosine >= 0.9).

Two measures of how much of the key the read state holds (chance 0.1 for both):

* **model**: the model's own probability of the key as the next character, renormalised over
  the ten digits, ``E[p(y_{n+1} = D | x_{n+1}) / p(y_{n+1} is a digit | x_{n+1})]`` with
  ``x_{n+1} ~ p(x | x_n)`` and ``x_n`` the read state;
* **linear probe**: the held-out accuracy of a multinomial logistic regression from the read
  state to the key, fitted on states of other documents at the same distance (information in
  the state that the model's transition and emission may not use).

Alongside, the posterior's own log-probability of the key where it is written (``key=D``,
the guide sees it) shows whether the model represents the digit at all. The curve is reported
as measured.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vmt.benchmarks.reading_memory import WINDOW
from vmt.benchmarks.report import BenchResult, markdown_table
from vmt.data.corpus import CharTokenizer, pydoc_texts
from vmt.inference.reading import ReadConfig, read
from vmt.inference.state_memory import MemoryReader, StateMemoryConfig
from vmt.inference.train import TrainConfig, fit
from vmt.models import VMTConfig
from vmt.models.vmt import VariationalMarkovTransformer

NAME = "state-memory"
SUMMARY = "long-range key probe at d = 64..4096: carried state vs window-only vs state memory"

logger = logging.getLogger(__name__)

DIGITS = "0123456789"
METHODS = ("carried", "window_only", "state_memory")


@dataclass(frozen=True)
class ProbeSetup:
    """The probe model and its training."""

    state_dim: int = 32
    hidden: int = 64
    steps: int = 2000
    learning_rate: float = 3e-3
    max_filler: int = 48
    train_documents: int = 4000
    annealing_start: float = 0.05
    probe_train: int = 100
    probe_test: int = 50
    reads: int = 4
    memory_reads: int = 2
    seed: int = 0


class KeyDocuments:
    """Key documents over the characters of the embedded corpus."""

    def __init__(self, seed: int) -> None:
        texts = pydoc_texts()
        self.tok = CharTokenizer.from_texts(texts + [DIGITS + "=;?"])
        self.filler = " ".join(texts)
        self.generator = torch.Generator().manual_seed(seed)
        self.digit_ids = [self.tok.encode(c)[0] for c in DIGITS]

    def draw(self, d: int, answer: bool) -> tuple[int, torch.Tensor]:
        """``(key index, (time,) tokens)`` of ``key=D;`` + ``d`` filler characters + ``?key=``
        (+ ``D`` with ``answer``)."""
        g = self.generator
        key = int(torch.randint(0, 10, (1,), generator=g))
        start = int(torch.randint(0, len(self.filler) - d - 1, (1,), generator=g))
        text = f"key={DIGITS[key]};" + self.filler[start : start + d] + "?key="
        if answer:
            text += DIGITS[key]
        return key, torch.tensor(self.tok.encode(text), dtype=torch.long)


def fit_probe_model(setup: ProbeSetup, docs: KeyDocuments):
    """A character VMT with a GRU reader fitted on key documents with answers."""
    torch.manual_seed(setup.seed)
    train = []
    for _ in range(setup.train_documents):
        d = int(torch.randint(0, setup.max_filler + 1, (1,), generator=docs.generator))
        train.append(docs.draw(d, answer=True)[1])
    vocab = docs.tok.vocab_size
    config = VMTConfig(state_dim=setup.state_dim, obs_dim=vocab, feature_dim=setup.hidden,
                       guide_hidden=setup.hidden, transition_hidden=setup.hidden,
                       max_window=WINDOW)
    spec = {"kind": "gru", "kwargs": {"input": "tokens", "hidden_size": setup.hidden,
                                       "vocab_size": vocab, "embed_dim": 32}}
    vmt = VariationalMarkovTransformer(config, reader_spec=spec)
    result = fit(vmt, train, TrainConfig(
        steps=setup.steps, batch_size=16, learning_rate=setup.learning_rate, min_length=2,
        max_length=setup.max_filler + 16, budget=2048, aux_weight=0.0, max_skip=0,
        annealing_start=setup.annealing_start, annealing_steps=int(0.6 * setup.steps),
        seed=setup.seed), progress=False)
    if not result.ok:
        raise RuntimeError(f"probe model training stopped: {result.stopped}")
    vmt.eval()
    return vmt, result


@torch.no_grad()
def key_probability(vmt, state: torch.Tensor, key_id: int, digit_ids: list[int]) -> float:
    """``E[p(y = key | x', y is a digit)]`` with ``x' ~ p(x' | x)`` over the rows of ``state``.

    Renormalised over the ten digits, so chance is exactly 0.1 whether or not the model has
    learned that a digit comes next.
    """
    nxt = vmt.transition.distribution(state).sample()
    logits = vmt.emission.logits(nxt)[:, digit_ids]
    return float(logits.softmax(-1)[:, digit_ids.index(key_id)].mean())


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, weight_decay: float = 1e-2) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic regression.

    ``train_x (documents, reads, state)`` with labels ``(documents,)``: every read is a
    training example; a test document is classified by its reads' summed log-probabilities.
    """
    x = train_x.reshape(-1, train_x.shape[-1]).double()
    mean, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / sd
    y = train_y.repeat_interleave(train_x.shape[1])
    w = torch.zeros(x.shape[1], 10, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        z = (test_x.double() - mean) / sd
        scores = torch.log_softmax(z @ w + b, -1).sum(1)  # (documents, 10)
        return float((scores.argmax(-1) == test_y).double().mean())


def read_states(vmt, tokens: torch.Tensor, reads: int, memory_reads: int,
                memory: StateMemoryConfig) -> dict:
    """``(reads, state)`` read states of one probe document for each method
    (``(memory_reads, state)`` for the state memory, whose readers carry one state each)."""
    config = ReadConfig(window=WINDOW, score=False)
    return {
        "carried": read(vmt, tokens, config, samples=reads).state,
        "window_only": read(vmt, tokens[-WINDOW:], config, samples=reads).state,
        "state_memory": torch.cat([MemoryReader(vmt, memory, window=WINDOW).read(tokens)
                                   for _ in range(memory_reads)]),
    }


@torch.no_grad()
def key_written_logprob(vmt, docs: KeyDocuments, n: int = 32) -> float:
    """Mean posterior ``log p(y = D | x)`` at the position where the key is written."""
    total = 0.0
    for _ in range(n):
        _, tokens = docs.draw(16, answer=True)
        res = read(vmt, tokens, ReadConfig(window=WINDOW, keep_path=True), samples=4)
        total += float(vmt.emission.log_prob(res.path[:, 4], tokens[4].expand(4)).mean())
    return total / n


def run(quick: bool, figure_dir: Path) -> BenchResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    setup = ProbeSetup(steps=200, probe_train=30, probe_test=15, train_documents=1000) if quick else ProbeSetup()
    docs = KeyDocuments(setup.seed)
    vmt, trained = fit_probe_model(setup, docs)
    written = key_written_logprob(vmt, docs)
    distances = (16, 64) if quick else (16, 64, 256, 1024, 4096)
    memory = StateMemoryConfig(capacity=64, store_every=64, threshold=0.9, recall_length=16,
                               min_age=128)
    rows, metrics = [], {"key_written_logprob": written,
                         "train_neg_elbo_per_char": -trained.history[-1]["elbo_per_token"]}
    curves = {f"{k}_{m}": [] for k in ("model", "probe") for m in METHODS}
    for d in distances:
        logger.info("distance %d", d)
        n = setup.probe_train + setup.probe_test
        keys, states = torch.empty(n, dtype=torch.long), {m: [] for m in METHODS}
        model_p = {m: [] for m in METHODS}
        for i in range(n):
            keys[i], tokens = docs.draw(d, answer=False)
            got = read_states(vmt, tokens, setup.reads, setup.memory_reads, memory)
            for m in METHODS:
                states[m].append(got[m])
                if i >= setup.probe_train:
                    model_p[m].append(key_probability(vmt, got[m], docs.digit_ids[keys[i]],
                                                      docs.digit_ids))
        row = [d]
        for m in METHODS:
            s = torch.stack(states[m])  # (documents, reads, state)
            t = setup.probe_train
            acc = linear_probe_accuracy(s[:t], keys[:t], s[t:], keys[t:])
            p = sum(model_p[m]) / len(model_p[m])
            metrics[f"key_prob_{m}_d{d}"] = p
            metrics[f"probe_acc_{m}_d{d}"] = acc
            curves[f"model_{m}"].append(p)
            curves[f"probe_{m}"].append(acc)
            row += [p, acc]
        rows.append(row)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind, title in ((axes[0], "model", "model's p(key | state), renormalised"),
                            (axes[1], "probe", "linear probe accuracy (held out)")):
        for m in METHODS:
            ax.plot(distances, curves[f"{kind}_{m}"], marker="o", label=m.replace("_", " "))
        ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("distance d (characters)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure = Path(figure_dir) / "state_memory.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    header = ["distance d"] + [f"{m.replace('_', ' ')}: {k}" for m in METHODS
                               for k in ("model p", "probe acc")]
    control = distances[0]
    far = [d for d in distances if d > WINDOW]
    best_far = max((metrics[f"probe_acc_carried_d{d}"] for d in far), default=float("nan"))
    held = metrics[f"key_prob_carried_d{control}"] > 0.2
    probed = metrics[f"probe_acc_carried_d{control}"] > 0.3
    reading = [
        f"Where the key is written, the posterior gives it log-probability {written:.2f} "
        f"(chance {math.log(0.1):.2f}), so the model "
        + ("does represent the digit there." if written > math.log(0.3)
           else "barely represents the digit even there."),
        f"At the control distance {control}, inside the training range, the model's own "
        f"prediction of the key is {metrics[f'key_prob_carried_d{control}']:.2f} and the linear "
        f"probe's accuracy {metrics[f'probe_acc_carried_d{control}']:.2f}"
        + (": the fitted transition carries the key over distances it was trained on."
           if held else
           ": the fitted transition does not carry the key even over distances it was trained "
           "on, so the longer distances cannot show forgetting; they show the same absence.")
        + ("" if held or not probed else
           " The state still holds the key (the probe reads it), but the model does not use it."),
    ]
    if far:
        reading.append(f"Beyond the window the best carried-state probe accuracy is {best_far:.2f}.")
    markdown = "\n\n".join([
        "How much of a key digit written `d` characters back the read state still holds "
        "(chance 0.1 for every column). *Model p*: the model's own probability of the key as "
        "the next character, renormalised over the ten digits, mean over "
        f"{setup.probe_test} probe documents ({setup.reads} reads each; {setup.memory_reads} "
        "for the state memory). *Probe acc*: held-out "
        "accuracy of a linear (multinomial logistic) probe from the read state to the key, "
        f"fitted on {setup.probe_train} other documents at the same distance. The model reads "
        f"with a {WINDOW}-character window; *window only* reads just the last {WINDOW} "
        "characters, so it equals *carried* until the key leaves the window.",
        markdown_table(header, rows),
        f"![state memory](figures/{figure.name})",
        f"The model is a character-level VMT (state {setup.state_dim}, GRU reader) fitted for "
        f"{setup.steps} SVI steps (KL annealed from {setup.annealing_start}) on "
        f"{setup.train_documents} key documents with fillers of at most {setup.max_filler} "
        f"characters; final training -ELBO {metrics['train_neg_elbo_per_char']:.3f} nats per "
        "character. " + " ".join(reading),
    ])
    return BenchResult(NAME, metrics, {"quick": quick, "distances": list(distances),
                                       "window": WINDOW, "setup": asdict(setup)},
                       markdown=markdown, figures=[figure])
