"""Seeded long-memory tasks generated locally (no download).

* **Rock-paper-scissors** against a player with a 50/30/20 move preference; each prompt
  reveals the player's previous move, the model answers by option likelihood. The best
  fixed strategy (always beat the favourite) wins about 50% of rounds.
* **Grocery key recall**: an instruction to buy one item, ``N`` distractor multiple-choice
  questions, then "what did I ask you to buy?" answered by the item's *name*: the four
  candidate names are scored as continuations of "You asked me to buy" (a small model
  cannot map an item to a letter reliably, so letters would measure that, not memory).
* **Passkey retrieval**: a five-digit key stated once inside natural-text filler (English
  reference prose from CPython's ``pydoc_data.topics``, never a repeated sentence) at a
  chosen depth; the question at the end.
* **Dialogue response selection**: a generated multi-turn chat. The user states a few
  personal facts (dog's name, home town, job, favourite food), then ``N`` turns of small
  talk that never mention them (templates with varied content, no sentence twice), then a
  user turn alluding to one fact; of ``K`` candidate assistant responses (one template,
  values from the same list) exactly one agrees with the stated fact. No multi-turn
  dialogue corpus ships with the installed packages, hence the generator.

Every generator is a pure function of its arguments and ``seed``. The task *runners* that
play a session against a memory method live in :mod:`vmt.memory.methods`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RPS_MOVES = ("rock", "paper", "scissors")
#: The move that beats each move.
RPS_COUNTER = {"rock": "paper", "paper": "scissors", "scissors": "rock"}
LETTERS = ("A", "B", "C", "D")

GROCERY_ITEMS = (
    "apples", "bananas", "carrots", "eggs", "milk", "bread", "butter", "cheese", "yogurt",
    "rice", "pasta", "flour", "sugar", "salt", "pepper", "coffee", "tea", "honey", "jam",
    "oranges", "lemons", "grapes", "strawberries", "tomatoes", "potatoes", "onions", "garlic",
    "spinach", "lettuce", "cucumbers", "broccoli", "mushrooms", "chicken", "salmon", "tuna",
    "beans", "lentils", "oats", "cereal", "crackers", "cookies", "chocolate", "olive oil",
    "vinegar", "ketchup", "mustard", "peanut butter", "almonds", "walnuts", "popcorn",
)  # fmt: skip

_CATEGORIES = {
    "an animal": ("dog", "horse", "rabbit", "tiger", "sheep", "eagle", "dolphin", "goat"),
    "a colour": ("red", "green", "blue", "yellow", "purple", "orange", "brown", "black"),
    "a musical instrument": ("violin", "piano", "flute", "drum", "guitar", "trumpet", "harp"),
    "a tool": ("hammer", "saw", "wrench", "screwdriver", "drill", "chisel", "pliers"),
    "a planet": ("Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Uranus"),
}


@dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice question: ``prompt`` text, option texts, index of the right one."""

    prompt: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class CompletionQuestion:
    """A question answered by scoring whole continuations of ``prompt``.

    Attributes:
        prompt: text up to where the answer starts (e.g. ``"...Assistant: You asked me to buy"``).
        continuations: candidate texts read right after ``prompt`` (each starts with a space).
        answer: index of the right continuation.
    """

    prompt: str
    continuations: tuple[str, ...]
    answer: int


# --------------------------------------------------------------------------- RPS
def rps_preferences(favourite: str, preference: tuple[float, float, float] = (0.5, 0.3, 0.2)):
    """Move probabilities: ``favourite`` gets ``preference[0]``, the next moves in the cycle
    rock -> paper -> scissors the other two."""
    if favourite not in RPS_MOVES:
        raise ValueError(f"favourite must be one of {RPS_MOVES}, got {favourite!r}")
    if len(preference) != 3 or any(p < 0 for p in preference) or abs(sum(preference) - 1) > 1e-9:
        raise ValueError(f"preference must be 3 non-negative numbers summing to 1, got {preference}")
    start = RPS_MOVES.index(favourite)
    return {RPS_MOVES[(start + i) % 3]: float(preference[i]) for i in range(3)}


def rps_player_moves(
    n_rounds: int,
    favourite: str,
    seed: int,
    preference: tuple[float, float, float] = (0.5, 0.3, 0.2),
) -> list[str]:
    """The player's moves for ``n_rounds`` rounds, drawn i.i.d. from its preference."""
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    probs = rps_preferences(favourite, preference)
    rng = random.Random(seed)
    moves, weights = list(probs), list(probs.values())
    return rng.choices(moves, weights=weights, k=n_rounds)


RPS_INTRO = (
    "User: Let's play many rounds of rock-paper-scissors. In each round you choose one "
    "option: (A) rock (B) paper (C) scissors. After each round I tell you what I played. "
    "Try to win as often as you can by learning my habits.\n"
)
RPS_OPTIONS = ("A", "B", "C")  # rock, paper, scissors


def rps_round_prompt(previous_move: str | None) -> str:
    """Prompt of one round; the player's previous move is revealed (none in round one)."""
    head = "Round 1." if previous_move is None else f"I played {previous_move}. Next round."
    return f"User: {head} (A) rock (B) paper (C) scissors?\nAssistant: I choose ("


def rps_outcome(model_move: str, player_move: str) -> int:
    """+1 win, 0 tie, -1 loss for the model."""
    if model_move == player_move:
        return 0
    return 1 if RPS_COUNTER[player_move] == model_move else -1


# --------------------------------------------------------------------------- grocery
def _mc(rng: random.Random, stem: str, right: str, wrong: list[str]) -> MCQuestion:
    options = [right, *wrong[:3]]
    rng.shuffle(options)
    letters = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return MCQuestion(f"User: {stem} {letters}\nAssistant: (", tuple(options), options.index(right))


def distractor_question(rng: random.Random) -> MCQuestion:
    """One easy multiple-choice question (arithmetic or category membership)."""
    if rng.random() < 0.5:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        right = a + b
        wrong = rng.sample([v for v in range(right - 9, right + 10) if v != right and v > 0], 3)
        return _mc(rng, f"What is {a} + {b}?", str(right), [str(w) for w in wrong])
    names = list(_CATEGORIES)
    cat = rng.choice(names)
    right = rng.choice(_CATEGORIES[cat])
    others = [rng.choice(_CATEGORIES[c]) for c in rng.sample([c for c in names if c != cat], 3)]
    return _mc(rng, f"Which of these is {cat}?", right, others)


@dataclass(frozen=True)
class GrocerySession:
    """Instruction, distractor questions, and the recall question (answer = the item).

    ``recall.continuations`` are four item names with a leading space (the item and three
    others, in random order); the right one is ``" " + item``.
    """

    item: str
    instruction: str
    distractors: tuple[MCQuestion, ...]
    recall: CompletionQuestion


def grocery_session(n_distractors: int, seed: int) -> GrocerySession:
    """A grocery key-recall session with ``n_distractors`` questions between key and recall."""
    if n_distractors < 0:
        raise ValueError(f"n_distractors must be >= 0, got {n_distractors}")
    rng = random.Random(seed)
    item = rng.choice(GROCERY_ITEMS)
    instruction = (
        f"User: Please remember this for later: I need you to buy {item} at the grocery store "
        "today. Now let me ask you some other questions.\nAssistant: OK, I will remember.\n"
    )
    distractors = tuple(distractor_question(rng) for _ in range(n_distractors))
    names = [item, *rng.sample([g for g in GROCERY_ITEMS if g != item], 3)]
    rng.shuffle(names)
    # The candidates are not listed in the question: listed, SmolLM2 favours the first one
    # named; unlisted, the question is pure recall and the candidates only score it.
    recall = CompletionQuestion(
        "User: What did I ask you to buy at the grocery store?\n"
        "Assistant: You asked me to buy",
        tuple(f" {n}" for n in names),
        names.index(item),
    )
    return GrocerySession(item, instruction, distractors, recall)


# --------------------------------------------------------------------------- passkey
def natural_filler(n_chars: int, seed: int) -> str:
    """``n_chars`` characters of English prose from ``pydoc_data.topics``, chosen by ``seed``.

    Documents are taken in a seeded random order, starting at a paragraph boundary, so the
    filler is natural text rather than a repeated sentence.
    """
    from pydoc_data.topics import topics

    if n_chars < 1:
        raise ValueError(f"n_chars must be >= 1, got {n_chars}")
    rng = random.Random(seed)
    keys = sorted(topics)
    rng.shuffle(keys)
    parts, total = [], 0
    for key in keys:
        doc = topics[key]
        paragraphs = [p for p in doc.split("\n\n") if p.strip()]
        start = rng.randrange(max(len(paragraphs) // 2, 1))
        piece = "\n\n".join(paragraphs[start:]) + "\n\n"
        parts.append(piece)
        total += len(piece)
        if total >= n_chars:
            break
    text = "".join(parts)
    if len(text) < n_chars:
        raise ValueError(f"the embedded corpus has only {len(text)} characters")
    return text[:n_chars]


def natural_text_stream(n_chars: int | None = None) -> str:
    """All of ``pydoc_data.topics`` in a fixed (sorted) order, optionally cut to ``n_chars``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text if n_chars is None else text[:n_chars]


@dataclass(frozen=True)
class PasskeyTrial:
    """Token ids of the context (ending just before the answer) and of the answer."""

    context: tuple[int, ...]
    answer: tuple[int, ...]
    key: str
    depth: float
    needle_start: int


PASSKEY_INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
    "remember it; I will ask for it at the end.\n\n"
)
#: The sentence that states the key (``{key}``), placed inside the filler.
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
#: The question after the filler; the answer is ``" " + key``.
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_trial(tokenize, n_tokens: int, depth: float, seed: int) -> PasskeyTrial:
    """A passkey-retrieval context of about ``n_tokens`` tokens with the key at ``depth``.

    Args:
        tokenize: ``str -> list[int]`` without special tokens.
        n_tokens: total context length in tokens (intro + filler + needle + question).
        depth: relative position of the needle in the filler, in [0, 1].
        seed: picks the key and the filler.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    intro = tokenize(PASSKEY_INTRO)
    needle = tokenize(PASSKEY_NEEDLE.format(key=key))
    question = tokenize(PASSKEY_QUESTION)
    answer = tokenize(f" {key}")
    n_filler = n_tokens - len(intro) - len(needle) - len(question)
    if n_filler < 1:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for filler")
    filler: list[int] = []
    n_chars = 6 * n_filler
    while len(filler) < n_filler:
        filler = tokenize(natural_filler(n_chars, seed))
        n_chars *= 2
    filler = filler[:n_filler]
    cut = round(depth * n_filler)
    context = intro + filler[:cut] + needle + filler[cut:] + question
    return PasskeyTrial(tuple(context), tuple(answer), key, depth, len(intro) + cut)


# --------------------------------------------------------------------------- dialogue
@dataclass(frozen=True)
class DialogueFact:
    """One kind of personal fact: its possible values and the sentences that use it.

    ``statement`` tells the fact (``{v}`` = value); ``probe`` is a later user turn alluding to
    it without the value; ``response`` is the assistant reply that names the value.
    """

    name: str
    values: tuple[str, ...]
    statement: str
    probe: str
    response: str


DIALOGUE_FACTS = (
    DialogueFact(
        "dog",
        ("Biscuit", "Rusty", "Luna", "Max", "Daisy", "Bruno", "Toby", "Milo", "Rosie", "Ziggy"),
        "I have a dog called {v}, who is three years old.",
        "My dog has been limping a little since our walk this morning.",
        " Oh no, I hope {v} feels better soon.",
    ),
    DialogueFact(
        "home town",
        ("Lisbon", "Bristol", "Dublin", "Krakow", "Toronto", "Melbourne", "Nairobi", "Osaka",
         "Seville", "Boston"),
        "I grew up in {v} and lived there until I was eighteen.",
        "Next month I am going back to visit the place where I grew up.",
        " Enjoy your trip back to {v}!",
    ),
    DialogueFact(
        "job",
        ("a nurse", "a teacher", "a plumber", "an architect", "a pilot", "a baker", "a lawyer",
         "a firefighter", "a librarian", "an electrician"),
        "I work as {v}.",
        "I had a really long day at work today.",
        " I am sorry to hear that; working as {v} can be exhausting.",
    ),
    DialogueFact(
        "favourite food",
        ("lasagne", "sushi", "paella", "pancakes", "curry", "tacos", "ramen", "dumplings",
         "risotto", "falafel"),
        "My favourite food is {v}.",
        "I want to make my favourite food tonight.",
        " Great idea, enjoy your {v}!",
    ),
)  # fmt: skip

_ACKS = (
    "Thanks for telling me.", "Good to know!", "That is nice to hear.", "I will keep that in mind.",
    "How interesting!", "Lovely, thank you for sharing.",
)  # fmt: skip

#: Small-talk user sentences: a template with one slot, each slot with ten fillers. None of
#: these words refers to a dog, a place of origin, work or food.
_SMALL_TALK = (
    ("The weather has been {} all week.",
     ("rainy", "sunny", "windy", "cold", "foggy", "warm", "grey", "humid", "chilly", "mild")),
    ("I watched a film about {} last night.",
     ("pirates", "space travel", "a bank robbery", "a chess champion", "a haunted house",
      "a jazz band", "a mountain rescue", "a detective", "time travel", "a sailing race")),
    ("I am reading a book about {}.",
     ("ancient Rome", "the history of maps", "bees", "volcanoes", "the deep sea",
      "medieval castles", "trains", "the moon", "glaciers", "clocks")),
    ("This weekend I might {}.",
     ("go hiking", "paint the fence", "visit a museum", "clean the garage",
      "try a new board game", "go to the cinema", "fix my bicycle", "plant some flowers",
      "go swimming", "learn to juggle")),
    ("Have you heard any good {} music lately?",
     ("jazz", "folk", "classical", "blues", "reggae", "country", "soul", "disco", "opera",
      "swing")),
    ("My neighbour just bought a {}.",
     ("red bicycle", "small boat", "vintage car", "electric scooter", "camper van", "motorbike",
      "telescope", "sports car", "tractor", "kayak")),
    ("I started learning {} this month.",
     ("to knit", "the guitar", "Spanish", "to draw", "chess", "photography", "pottery",
      "the piano", "to sew", "yoga")),
    ("I saw {} in the park today.",
     ("a huge rainbow", "a street magician", "two herons", "a kite festival", "a brass band",
      "a yoga class", "a chess tournament", "an old friend", "a hot air balloon",
      "a squirrel chasing a pigeon")),
)  # fmt: skip
_LEADS = ("", "By the way, ", "Anyway, ", "So, ", "Honestly, ", "You know, ")
_OPENERS = ("", "Oh, ", "Ah, ", "Well, ", "Wow, ")
_ADJECTIVES = ("nice", "fun", "interesting", "relaxing", "lovely", "exciting", "great",
               "unusual", "charming", "wonderful")  # fmt: skip
_FOLLOW_UPS = (
    "Tell me more about it.", "How did that come about?", "I would enjoy that too.",
    "What did you think of it?", "It is good to hear about your week.", "Keep me posted!",
    "I hope it stays that way.", "That must have been memorable.", "Was it what you expected?",
    "I like hearing about these things.",
)  # fmt: skip
#: Words the small talk must never contain (the facts' topics); checked by the tests.
DIALOGUE_TOPIC_WORDS = ("dog", "grew", "town", "work", "job", "food", "cook", "dinner", "eat")


def _lead(lead: str, sentence: str) -> str:
    if not lead or sentence.startswith("I "):
        return lead + sentence
    return lead + sentence[0].lower() + sentence[1:]


def small_talk_turns(n_turns: int, rng: random.Random) -> list[str]:
    """``n_turns`` small-talk exchanges ``"User: ...\\nAssistant: ...\\n"``, no sentence twice."""
    n_user = len(_LEADS) * sum(len(fill) for _, fill in _SMALL_TALK)
    n_reply = len(_OPENERS) * len(_ADJECTIVES) * len(_FOLLOW_UPS)
    if n_turns > min(n_user, n_reply) // 2:
        raise ValueError(f"n_turns must be <= {min(n_user, n_reply) // 2}, got {n_turns}")
    seen: set[str] = set()
    turns = []
    while len(turns) < n_turns:
        template, fillers = rng.choice(_SMALL_TALK)
        user = _lead(rng.choice(_LEADS), template.format(rng.choice(fillers)))
        opener = rng.choice(_OPENERS)
        reply = _lead(opener, f"That sounds {rng.choice(_ADJECTIVES)}.") + " " + rng.choice(
            _FOLLOW_UPS
        )
        reply = reply[0].upper() + reply[1:]
        if user in seen or reply in seen:
            continue
        seen.update((user, reply))
        turns.append(f"User: {user}\nAssistant: {reply}\n")
    return turns


@dataclass(frozen=True)
class DialogueSession:
    """A generated chat: facts stated, small talk, and one probe per fact.

    Attributes:
        facts: (fact name, value) pairs in the order they were stated.
        opening: one turn per fact, ``"User: ...\\nAssistant: ...\\n"``.
        small_talk: ``N`` turns that never mention the facts.
        probes: one per fact, in the order of ``facts``; ``prompt`` is a user turn alluding to
            the fact ending in ``"\\nAssistant:"``, ``continuations`` the ``K`` candidate
            responses, of which only ``continuations[answer]`` names the stated value.
    """

    facts: tuple[tuple[str, str], ...]
    opening: tuple[str, ...]
    small_talk: tuple[str, ...]
    probes: tuple[CompletionQuestion, ...]


def dialogue_session(n_turns: int, seed: int, n_candidates: int = 4) -> DialogueSession:
    """A dialogue response-selection session with ``n_turns`` small-talk turns.

    Args:
        n_turns: small-talk exchanges between the facts and the probes.
        seed: picks the values, their order, the small talk and the wrong candidates.
        n_candidates: ``K`` candidate responses per probe (chance accuracy ``1/K``).
    """
    if isinstance(n_turns, bool) or not isinstance(n_turns, int) or n_turns < 0:
        raise ValueError(f"n_turns must be an integer >= 0, got {n_turns!r}")
    n_values = min(len(f.values) for f in DIALOGUE_FACTS)
    if not 2 <= n_candidates <= n_values:
        raise ValueError(f"n_candidates must lie in [2, {n_values}], got {n_candidates}")
    rng = random.Random(seed)
    order = list(DIALOGUE_FACTS)
    rng.shuffle(order)
    acks = rng.sample(_ACKS, len(order))
    values = [rng.choice(f.values) for f in order]
    opening = tuple(
        f"User: {f.statement.format(v=v)}\nAssistant: {ack}\n"
        for f, v, ack in zip(order, values, acks, strict=True)
    )
    probes = []
    for f, v in zip(order, values, strict=True):
        options = [v, *rng.sample([w for w in f.values if w != v], n_candidates - 1)]
        rng.shuffle(options)
        probes.append(
            CompletionQuestion(
                f"User: {f.probe}\nAssistant:",
                tuple(f.response.format(v=o) for o in options),
                options.index(v),
            )
        )
    # drawn last, so sessions of any length share facts, probes and the first turns
    small_talk = tuple(small_talk_turns(n_turns, rng))
    facts = tuple((f.name, v) for f, v in zip(order, values, strict=True))
    return DialogueSession(facts, opening, small_talk, tuple(probes))
