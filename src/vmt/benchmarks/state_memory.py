"""A long-range probe: does the read state still know a key placed far back?

Documents are ``key=D;`` + filler + ``?key=D`` with a digit ``D`` and filler of natural text
(``pydoc`` topics, characters). A character-level VMT of the token family (memory 128, token
slot 16: a noisy recurrent language model written as a hidden Markov model) is trained so
that remembering pays: every training document states its key once and asks for it again
after each of ``queries`` stretches of filler (0 to ``max_gap`` characters each, several
reading windows in all), read whole in the windows regime with a 64-character window, the
state carried from window to window (detached). It is then probed at distances ``d`` in
{16, 64, 256, 1024, 4096} (quick: {16, 64}); ``d = 16`` sits inside one window. The probe
document stops just before the answer (``...?key=``); its state is read

* **carried**: the whole prefix read with the 64-character window and the state carried;
* **window only**: only the last 64 characters read (what a reader truncated to its window
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

Both come with 95% intervals over the held-out probe documents. The curve is reported as
measured.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vmt.benchmarks.report import BenchResult, markdown_table, wilson_interval
from vmt.data.corpus import CharTokenizer, pydoc_texts
from vmt.inference.reading import ReadConfig, read
from vmt.inference.state_memory import MemoryReader, StateMemoryConfig
from vmt.inference.train import TrainConfig, fit
from vmt.inference.windows import DocumentStreams
from vmt.models.vmt import VariationalMarkovTransformer, token_rnn_vmt

NAME = "state-memory"
SUMMARY = "long-range key probe at d = 64..4096: carried state vs window-only vs state memory"

logger = logging.getLogger(__name__)

DIGITS = "0123456789"
METHODS = ("carried", "window_only", "state_memory")


@dataclass(frozen=True)
class ProbeSetup:
    """The probe model, its training documents and its training."""

    memory_dim: int = 128
    token_dim: int = 16
    hidden: int = 64
    window: int = 64
    queries: int = 24
    max_gap: int = 20
    train_documents: int = 2000
    epochs: float = 8.0
    streams: int = 32
    learning_rate: float = 5e-3
    probe_train: int = 60
    probe_test: int = 60
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

    def _filler(self, n: int) -> str:
        start = int(torch.randint(0, len(self.filler) - n - 1, (1,), generator=self.generator))
        return self.filler[start : start + n]

    def draw(self, d: int, answer: bool) -> tuple[int, torch.Tensor]:
        """``(key index, (time,) tokens)`` of ``key=D;`` + ``d`` filler characters + ``?key=``
        (+ ``D`` with ``answer``)."""
        key = int(torch.randint(0, 10, (1,), generator=self.generator))
        text = f"key={DIGITS[key]};" + self._filler(d) + "?key="
        if answer:
            text += DIGITS[key]
        return key, torch.tensor(self.tok.encode(text), dtype=torch.long)

    def training_document(self, queries: int, max_gap: int) -> torch.Tensor:
        """``(time,)`` tokens of ``key=D;`` followed by ``queries`` times (0 to ``max_gap``
        filler characters + ``?key=D``): the key is asked for again and again, so a model
        that keeps it in its state predicts every answer."""
        key = DIGITS[int(torch.randint(0, 10, (1,), generator=self.generator))]
        parts = [f"key={key};"]
        for _ in range(queries):
            gap = int(torch.randint(0, max_gap + 1, (1,), generator=self.generator))
            parts.append(self._filler(gap) + f"?key={key}")
        return torch.tensor(self.tok.encode("".join(parts)), dtype=torch.long)


def fit_probe_model(setup: ProbeSetup, docs: KeyDocuments):
    """A character VMT of the token family fitted on key documents in the windows regime."""
    torch.manual_seed(setup.seed)
    train = [docs.training_document(setup.queries, setup.max_gap) for _ in range(setup.train_documents)]
    vmt = token_rnn_vmt(docs.tok.vocab_size, setup.memory_dim, setup.token_dim, setup.hidden, setup.window)
    epoch = len(DocumentStreams(train, setup.streams, setup.window).window_lengths())
    steps = max(1, round(setup.epochs * epoch))
    result = fit(vmt, train, TrainConfig(
        regime="windows", window=setup.window, batch_size=setup.streams, steps=steps,
        learning_rate=setup.learning_rate, lr_decay_steps=steps, lr_final_fraction=0.1,
        aux_weight=0.0, max_skip=0, log_every=max(1, epoch // 10), seed=setup.seed), progress=False)
    if not result.ok:
        raise RuntimeError(f"probe model training stopped: {result.stopped}")
    vmt.eval()
    last = [r for r in result.history if r["step"] > steps - epoch]  # the last pass
    bound = sum(-r["elbo_per_token"] for r in last) / len(last)
    return vmt, result, {"chars": sum(len(t) for t in train), "last_pass_neg_elbo": bound}


@torch.no_grad()
def key_probability(vmt: VariationalMarkovTransformer, state: torch.Tensor, key_id: int, digit_ids: list[int]) -> float:
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


def read_states(vmt: VariationalMarkovTransformer, tokens: torch.Tensor, reads: int, memory_reads: int,
                memory: StateMemoryConfig, window: int) -> dict:
    """``(reads, state)`` read states of one probe document for each method
    (``(memory_reads, state)`` for the state memory, whose readers carry one state each)."""
    config = ReadConfig(window=window, score=False)
    return {
        "carried": read(vmt, tokens, config, samples=reads).state,
        "window_only": read(vmt, tokens[-window:], config, samples=reads).state,
        "state_memory": torch.cat([MemoryReader(vmt, memory, window=window).read(tokens)
                                   for _ in range(memory_reads)]),
    }


def _mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a normal 95% interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _probe_distance(vmt: VariationalMarkovTransformer, docs: KeyDocuments, setup: ProbeSetup, d: int, memory: StateMemoryConfig) -> dict:
    """Model p(key) and probe accuracy with their intervals, per method, at distance ``d``."""
    n = setup.probe_train + setup.probe_test
    keys, states = torch.empty(n, dtype=torch.long), {m: [] for m in METHODS}
    model_p = {m: [] for m in METHODS}
    for i in range(n):
        keys[i], tokens = docs.draw(d, answer=False)
        got = read_states(vmt, tokens, setup.reads, setup.memory_reads, memory, setup.window)
        for m in METHODS:
            states[m].append(got[m])
            if i >= setup.probe_train:
                model_p[m].append(key_probability(vmt, got[m], docs.digit_ids[keys[i]], docs.digit_ids))
    out = {}
    t = setup.probe_train
    for m in METHODS:
        s = torch.stack(states[m])  # (documents, reads, state)
        acc = linear_probe_accuracy(s[:t], keys[:t], s[t:], keys[t:])
        mean, lo, hi = _mean_interval(model_p[m])  # a probability: the interval stays in [0, 1]
        out[m] = {"model": (mean, max(lo, 0.0), min(hi, 1.0)),
                  "probe": (acc, *wilson_interval(round(acc * setup.probe_test), setup.probe_test))}
    return out


def _cell(value: tuple[float, float, float]) -> str:
    return f"{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]"


def _figure(found: dict, distances: tuple, setup: ProbeSetup, figure_dir: Path) -> Path:
    """Model p and probe accuracy against distance, with their intervals, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind, title in ((axes[0], "model", "model's p(key | state), renormalised"),
                            (axes[1], "probe", "linear probe accuracy (held out)")):
        for m in METHODS:
            values = [found[d][m][kind] for d in distances]
            (line,) = ax.plot(distances, [v[0] for v in values], marker="o", label=m.replace("_", " "))
            ax.fill_between(distances, [v[1] for v in values], [v[2] for v in values],
                            color=line.get_color(), alpha=0.15)
        ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
        ax.axvline(setup.window, color="grey", ls="--", lw=0.8, label="reading window")
        ax.set_xscale("log")
        ax.set_xlabel("distance d (characters)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure = Path(figure_dir) / "state_memory.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    return figure


def _markdown(setup: ProbeSetup, metrics: dict, rows: list, distances: tuple, trained, train_chars: int,
              figure: Path) -> str:
    """The page's section: the table, the figure, the model and what the numbers say."""
    header = ["distance d"] + [f"{m.replace('_', ' ')}: {k}" for m in METHODS
                               for k in ("model p", "probe acc")]
    near, far4 = distances[0], 4 * setup.window
    reading = [f"At d = {near} (inside one window) the carried state's probe accuracy is "
               f"{metrics[f'probe_acc_carried_d{near}']:.2f} and the model's own p(key) "
               f"{metrics[f'key_prob_carried_d{near}']:.2f}."]
    if far4 in distances:
        reading.append(
            f"At d = {far4}, four reading windows back, the carried state's probe accuracy is "
            f"{metrics[f'probe_acc_carried_d{far4}']:.2f} "
            f"[{metrics[f'probe_acc_carried_d{far4}_lo']:.2f}, {metrics[f'probe_acc_carried_d{far4}_hi']:.2f}] "
            f"and the window-only read's {metrics[f'probe_acc_window_only_d{far4}']:.2f}: the key "
            "is out of the window, so what the carried state knows of it, it carried.")
    return "\n\n".join([
        "How much of a key digit written `d` characters back the read state still holds "
        "(chance 0.1 for every column). *Model p*: the model's own probability of the key as "
        "the next character, renormalised over the ten digits, mean over "
        f"{setup.probe_test} probe documents ({setup.reads} reads each; {setup.memory_reads} "
        "for the state memory) with a normal 95% interval. *Probe acc*: held-out accuracy of a "
        f"linear (multinomial logistic) probe from the read state to the key, fitted on "
        f"{setup.probe_train} other documents at the same distance, with a 95% Wilson interval "
        f"over the {setup.probe_test} test documents. The model reads with a "
        f"{setup.window}-character window; *window only* reads just the last {setup.window} "
        "characters, so it equals *carried* until the key leaves the window.",
        markdown_table(header, rows),
        f"![state memory](figures/{figure.name})",
        f"The model is a character-level VMT of the token family (memory {setup.memory_dim}, "
        f"token slot {setup.token_dim}, GRU reader for fresh starts; its guide's memory step is "
        f"the model's own) trained in the windows regime ({setup.window}-character windows, "
        f"{setup.streams} streams, the state carried and detached between windows) for "
        f"{trained.steps} steps ({setup.epochs:g} passes) over {setup.train_documents} key "
        f"documents of {train_chars} characters in all: each states its key once and asks for "
        f"it {setup.queries} times, after 0 to {setup.max_gap} filler characters each. Adam lr "
        f"{setup.learning_rate} with a cosine decay to a tenth; training -ELBO over the last pass "
        f"{metrics['train_neg_elbo_per_char']:.3f} nats per character (mean of the logged "
        "windows; most characters are text, and every answer after the first is predictable). "
        + " ".join(reading),
    ])


def run(quick: bool, figure_dir: Path) -> BenchResult:
    torch.set_num_threads(1)
    setup = (ProbeSetup(train_documents=300, epochs=1.0, probe_train=20, probe_test=20)
             if quick else ProbeSetup())
    docs = KeyDocuments(setup.seed)
    vmt, trained, record = fit_probe_model(setup, docs)
    train_chars = record["chars"]
    distances = (16, 64) if quick else (16, 64, 256, 1024, 4096)
    memory = StateMemoryConfig(capacity=64, store_every=64, threshold=0.9, recall_length=16,
                               min_age=128)
    rows, metrics = [], {"train_neg_elbo_per_char": record["last_pass_neg_elbo"],
                         "train_steps": float(trained.steps), "train_chars": float(train_chars)}
    found = {}
    for d in distances:
        logger.info("distance %d", d)
        found[d] = got = _probe_distance(vmt, docs, setup, d, memory)
        row = [d]
        for m in METHODS:
            for kind in ("model", "probe"):
                value, lo, hi = got[m][kind]
                name = "key_prob" if kind == "model" else "probe_acc"
                metrics[f"{name}_{m}_d{d}"] = value
                metrics[f"{name}_{m}_d{d}_lo"], metrics[f"{name}_{m}_d{d}_hi"] = lo, hi
                row.append(_cell(got[m][kind]))
        rows.append(row)

    figure = _figure(found, distances, setup, figure_dir)
    markdown = _markdown(setup, metrics, rows, distances, trained, train_chars, figure)
    return BenchResult(NAME, metrics, {"quick": quick, "distances": list(distances),
                                       "window": setup.window, "setup": asdict(setup)},
                       markdown=markdown, figures=[figure])
