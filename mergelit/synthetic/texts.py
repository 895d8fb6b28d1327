"""Synthetic GLUE texts: one generator per task, each with its own rule, vocabulary and style, so that a model
fine-tuned on one task is good at it and not at the others (label names as on the hub):

- cola: a grammatical sentence (acceptable) vs the same words shuffled (unacceptable).
- sst2: lower-cased review fragments with positive vs negative sentiment words.
- mrpc: news + a light rewording (equivalent) vs other news or "<subject> declined to comment on ..." (not_equivalent).
- qqp: a request asked two ways (duplicate) vs another request or "Which is better ..., X or Y?" (not_duplicate).
- qnli: a question + a sentence telling of its event (entailment) vs another event or a general remark (not_entailment).
- rte: facts about a person + some of them (entailment) vs changed facts or a plan ("plans to", ...; not_entailment).
- mnli: a premise + one of its clauses (entailment) / another clause, half the time with a reason ("because it was
  late", ...; neutral) / the clause negated with "not", "never" or "no" (contradiction).

Comparing two texts word by word is slow for a tiny GPT-2 to learn, so in the pair tasks half of one class also
carries a task-specific phrase (the quoted ones above), much like the annotation artifacts of the real datasets:
every task is learnable in a few epochs. Texts are 3 to ~45 words (some pairs pass 60 tokens); labels are balanced;
everything is a function of the seed.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Sequence

from mergelit.tasks import GLUE_TASKS


def _pairs(text: str, separator: str = " ") -> list[tuple[str, ...]]:
    """``"a/b c/d"`` -> ``[("a", "b"), ("c", "d")]``."""
    return [tuple(pair.split("/")) for pair in text.split(separator)]


# Ordinary words. Verbs are (base, past) so that negation ("did not" + base) reads right.
PEOPLE = ("teacher farmer child doctor student painter neighbor driver baker sailor writer soldier friend girl boy "
          "woman man pilot nurse artist hunter singer player captain guard cook").split()
ANIMALS = "dog cat horse bird fox rabbit goat cow owl duck".split()
THINGS = ("letter book table window car boat picture door apple stone box lamp chair bottle basket coat ladder "
          "wagon kettle blanket fence map bell key bucket rope clock").split()
PLACES = "river bridge village market station forest school harbor hill church library park lake farm".split()
ADJECTIVES = ("old small large quiet green red heavy bright empty narrow cold tall young wooden busy distant round "
              "dark clean yellow").split()
ADVERBS = "quickly slowly quietly carefully yesterday again suddenly early later often".split()
PREPOSITIONS = "near behind under beside across inside around past".split()
CONJUNCTIONS = "and but while because after before".split()
TRANSITIVE = _pairs("find/found build/built paint/painted open/opened carry/carried watch/watched visit/visited "
                    "clean/cleaned sell/sold buy/bought move/moved fix/fixed follow/followed close/closed draw/drew "
                    "notice/noticed lift/lifted drop/dropped wash/washed borrow/borrowed")
INTRANSITIVE = _pairs("sleep/slept laugh/laughed wait/waited smile/smiled arrive/arrived sing/sang rest/rested "
                      "walk/walked")

POSITIVE = ("wonderful brilliant charming delightful moving funny beautiful clever gripping superb excellent "
            "memorable fresh touching engaging stunning witty enjoyable powerful elegant").split()
NEGATIVE = ("dull boring awful tedious clumsy bland messy pointless lifeless weak forgettable terrible painful silly "
            "flat predictable tiresome shallow confusing ugly").split()
REVIEW_NOUNS = ("film movie story plot script cast director ending performance soundtrack dialogue screenplay acting "
                "sequel comedy drama").split()

NEWS_SUBJECTS = ("the company|the bank|officials|the government|the union|the court|the council|investors|analysts|"
                 "the agency|police|the ministry|the airline|the hospital").split("|")
# (verb, synonym) and (object, synonym) so that a paraphrase can swap one for the other.
NEWS_VERBS = _pairs("said/stated|reported/noted|announced/disclosed|approved/passed|rejected/turned down|"
                    "expected/predicted|raised/increased|cut/reduced|confirmed/acknowledged|delayed/postponed", "|")
NEWS_OBJECTS = _pairs("its profit forecast/its earnings outlook|the new budget/the spending plan|the merger/the deal|"
                      "the contract/the agreement|the plan/the proposal|interest rates/borrowing costs|wages/pay|"
                      "prices/costs|the payment/the transfer|the investigation/the inquiry|its dividend/its payout|"
                      "the tax cut/the tax reduction", "|")
NEWS_SOURCES = ("a spokesman said", "according to a statement", "the report showed",
                "people familiar with the matter said", "")
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday".split()
MONTHS = "January February March April May June July August September October November December".split()

QUESTION_VERBS = _pairs("learn/study|cook/prepare|fix/repair|improve/get better at|clean/wash|choose/pick|grow/plant|"
                        "save/keep|start/begin|sell/get rid of|paint/decorate", "|")
QUESTION_OBJECTS = ("brown rice|an old bike|a vegetable garden|my first resume|a second hand laptop|my spoken english|"
                    "cherry tomatoes|a little money|a small online business|old wooden furniture|an acoustic guitar|"
                    "a used car|a tiny kitchen|a personal website|strong coffee|a tropical fish tank").split("|")
QUESTION_TAILS = ("at home|on a budget|without any help|in a month|as a beginner|for my family|in a small flat|"
                  "before winter|with no experience|after work").split("|")
QUESTION_FRAMES = ("How do I {} {} {}?", "What is the best way to {} {} {}?", "How can I {} {} {}?",
                   "What should I know before I {} {} {}?", "Is it hard to {} {} {}?",
                   "Can anyone tell me how to {} {} {}?")

NAMES = ("Maria Lopez|John Smith|Anna Berg|David Chen|Sara Khan|Peter Novak|Elena Rossi|Tom Walker|Nina Park|"
         "Omar Haddad|Lucy Brown|Ivan Petrov|Grace Kim|Paul Martin|Hana Sato|Leo Fischer").split("|")
CITIES = ("Oslo Lima Dublin Madrid Vienna Cairo Lisbon Prague Boston Seattle Denver Sydney Toronto Athens Nairobi "
          "Quito").split()
ORGANIZATIONS = ("a bakery|a bookshop|a radio station|a football club|a small school|a shipping firm|a theater|"
                 "a clinic|a newspaper|a hotel").split("|")

# Share of one class of each pair task that carries its cue phrase (module docstring): a
# model that only spots the phrase reaches 0.5 + CUE_FRACTION / 2 on the binary ones.
CUE_FRACTION = 0.5

REASONS = ("because it was late", "for the first time", "to win a prize", "with a friend", "for a long time")
REMARKS = ("Many families still keep {a} {thing} at home", "Today , such {thing}s are rare outside the {place}",
           "{A} {thing} is a common sight in every {place}")


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


def _clauses(rng: random.Random, subjects: Sequence[str], objects: Sequence[str], at_most: int = 40) -> list[list[str]]:
    """Clauses (joined later with conjunctions) adding up to about a sampled length: mostly short texts, some
    medium, a few long ones (so some pairs pass 60 tokens)."""
    roll = rng.random()
    low, high = (4, 16) if roll < 0.7 else (17, 28) if roll < 0.92 else (29, 40)
    target = min(rng.randint(low, high), at_most)
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
    words = _join(rng, _clauses(rng, PEOPLE + ANIMALS, THINGS + ANIMALS, at_most=30))
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
    fragments = []
    # Every fragment carries one word of the label's polarity; lengths vary with the count.
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        noun, word, other = rng.choice(REVIEW_NOUNS), rng.choice(sentiment), rng.choice(sentiment)
        a_word = f"{_article(word)} {word}"
        candidates = (  # every candidate is built (drawing its words) before one is chosen
            f"the {noun} is {word}", f"{a_word} {noun}", f"{a_word} and {other} {noun}",
            f"the {noun} feels {word} from start to finish",
            f"its {rng.choice(ADJECTIVES)} {noun} is {rng.choice(('very', 'truly', 'quite', 'often'))} {word}",
            f"{word} , {rng.choice(ADJECTIVES)} and {other}",
            f"the {noun} {rng.choice(TRANSITIVE)[1]} the {rng.choice(PEOPLE)} with {a_word} {rng.choice(REVIEW_NOUNS)}",
        )
        fragments.append(rng.choice(candidates))
    # SST-2 style: lower case, spaced punctuation, no capital.
    return (" , ".join(fragments) + rng.choice((" . ", " ", " ")),)


def _news(rng: random.Random) -> dict[str, Any]:
    number = rng.choice((f"{rng.randint(2, 40)} percent", f"$ {rng.randint(1, 90)}.{rng.randint(1, 9)} million"))
    when = rng.choice((f"on {rng.choice(WEEKDAYS)}", f"in {rng.choice(MONTHS)}", "last year", "this week"))
    return {
        "subject": rng.choice(NEWS_SUBJECTS), "verb": rng.choice(NEWS_VERBS), "object": rng.choice(NEWS_OBJECTS),
        "number": number, "when": when, "source": rng.choice(NEWS_SOURCES),
        "extra": _join(rng, _clauses(rng, PEOPLE, THINGS, at_most=14)) if rng.random() < 0.4 else [],
    }


def _news_text(rng: random.Random, news: dict[str, Any], reword: bool) -> str:
    verb, obj = news["verb"][reword], news["object"][reword]
    core = f"{news['subject']} {verb} {obj} by {news['number']}"
    # A paraphrase may move the time phrase to the front, and drop the source.
    text = f"{news['when']} , {core}" if reword and rng.random() < 0.6 else f"{core} {news['when']}"
    source = news["source"] if not reword or rng.random() < 0.5 else ""
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


def _request(rng: random.Random) -> dict[str, Any]:
    """What a question asks for: a verb (with a synonym), an object and a circumstance."""
    verbs, obj = rng.choice(QUESTION_VERBS), rng.choice(QUESTION_OBJECTS)
    return {"verbs": verbs, "object": obj, "tail": rng.choice(QUESTION_TAILS)}


def _question(rng: random.Random, request: dict[str, Any]) -> str:
    return rng.choice(QUESTION_FRAMES).format(rng.choice(request["verbs"]), request["object"], request["tail"])


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


def _event(rng: random.Random) -> dict[str, Any]:
    """Who did what to which thing, where: what a QNLI question asks about."""
    person, verb = rng.choice(PEOPLE), rng.choice(TRANSITIVE)
    thing = " ".join(rng.sample(ADJECTIVES, rng.choice((1, 2))) + [rng.choice(THINGS)])
    place = f"{rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}"
    return {"person": person, "verb": verb, "thing": thing, "place": place}


def _qnli(rng: random.Random, label: int) -> tuple[str, ...]:
    event = _event(rng)
    (base, past), thing = event["verb"], event["thing"]
    person, place = event["person"], event["place"]
    question = rng.choice((
        f"Where did the {person} {base} the {thing}?", f"When did the {person} {base} the {thing} {place}?",
        f"Who {past} the {thing} {place}?", f"Why was the {thing} {past} {place}?",
    ))
    # Wikipedia-like: the sentence tells of the question's event (entailment), or of
    # another one, or is a general remark about another thing.
    if label == 1 and rng.random() < CUE_FRACTION:
        thing = rng.choice([t for t in THINGS if t != thing.split()[-1]])
        a = _article(thing)
        remark = rng.choice(REMARKS).format(a=a, A=a.capitalize(), thing=thing, place=rng.choice(PLACES))
        return question, _sentence(remark.split())
    if label == 1:
        other = _event(rng)
        while other["thing"].split()[-1] == thing.split()[-1] or other["verb"] == event["verb"]:
            other = _event(rng)
        event = other
    year = rng.randint(1650, 1990)
    past, person, thing, place = event["verb"][1], event["person"], event["thing"], event["place"]
    sentence = rng.choice((
        f"The {thing} was {past} by a {person} {place} in {year}", f"In {year} , a {person} {past} the {thing} {place}",
        f"Local records say that a {person} {past} the {thing} {place} in {year}",
    ))
    if rng.random() < 0.4:
        sentence += " , " + " ".join(_join(rng, _clauses(rng, ANIMALS, PLACES, at_most=16)))
    return question, _sentence(sentence.split())


def _rte(rng: random.Random, label: int) -> tuple[str, ...]:
    name = rng.choice(NAMES)
    first = name.split()[0]
    city, other_city = rng.sample(CITIES, 2)
    org, other_org = rng.sample(ORGANIZATIONS, 2)
    year, other_year = rng.sample(range(1950, 2016), 2)
    premise = rng.choice((
        f"{name} , who founded {org} in {year} , lives in {city}",
        f"{name} now lives in {city} , where {first} founded {org} in {year}",
        f"{name} lives in {city} and founded {org} in {year}",
        f"In {year} , {name} founded {org} , and today {first} lives in {city}",
    ))
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
    hypothesis = rng.choice((
        f"{name} lives in {city}", f"{name} founded {org} in {year}", f"{name} lives in {city} and founded {org}",
        f"{name} , who lives in {city} , founded {org} in {year}", f"{first} founded {org} in {city}",
    ))
    return _sentence(premise.split()), _sentence(hypothesis.split())


def _negate(rng: random.Random, clause: list[str]) -> list[str]:
    """Negate a clause from ``_clause``: ``no`` for its determiner or ``did not``/``never``."""
    verbs = {past: base for base, past in TRANSITIVE + INTRANSITIVE}
    position = next(i for i, word in enumerate(clause) if word in verbs)
    negation = rng.choice(("not", "never", "no"))
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


_GENERATORS = {"cola": _cola, "mnli": _mnli, "mrpc": _mrpc, "qnli": _qnli, "qqp": _qqp, "rte": _rte, "sst2": _sst2}


def examples(task: str, split: str, size: int, seed: int) -> dict[str, list[Any]]:
    """Columns of one split: balanced labels in random order; test labels are -1."""
    # A str seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"mergelit-synthetic/{seed}/{task}/{split}")
    num_labels = GLUE_TASKS[task].num_labels
    labels = [i % num_labels for i in range(size)]
    rng.shuffle(labels)
    mismatched = task == "mnli" and split.endswith("mismatched")
    generate = functools.partial(_mnli, genre=1) if mismatched else _GENERATORS[task]
    rows = [generate(rng, label) for label in labels]
    fields = GLUE_TASKS[task].text_fields
    columns: dict[str, list[Any]] = {field: [row[i] for row in rows] for i, field in enumerate(fields)}
    columns["label"] = [-1] * size if split.startswith("test") else labels
    columns["idx"] = list(range(size))
    return columns
