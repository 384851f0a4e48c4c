"""The demo's made-up world: a pretraining corpus of short stories and a "what kind of word" task.

Stories are templated English about invented people (names built from syllables) and towns
(`Tol` + `ford`): where they live, their job, their pet and its colour, what they eat. Every kind
of word has contexts of its own ("a <job> by trade", "a <colour> <animal> that", "eats <food>
for dinner"), so a model trained on the stories learns the kinds without ever being told them. The base
model is pretrained on these stories only: it never sees a question or an answer.

The finetuning task asks for the kind of one word and expects one of six answers:

    instruction: "What kind of word is Tolford?"        output: "a town"
    instruction: "What kind of thing is goose?"         output: "an animal"

Exact match is well defined (one right answer per question), and the words of the validation
split never occur in the training split: the answers to them come from what the base learned in
pretraining. Everything is drawn from seeded `random.Random`s.
"""

from __future__ import annotations

import random
from typing import Iterator

_SYLLABLES = ("ma", "ri", "to", "bin", "kes", "tra", "lo", "ven", "da", "mir", "sel", "ka", "nor", "li", "pa",
              "dun", "ra", "vi", "el", "sa", "tor", "fen", "ga", "mo", "ne", "rin", "bel", "ta", "ju", "wen")
_TOWN_HEADS = ("Bram", "Tol", "Ash", "Cor", "Dun", "Elm", "Fal", "Gal", "Har", "Kel", "Lin", "Mor", "Nor", "Pel",
               "Quin", "Ros", "Sil", "Thorn", "Ul", "Ves", "Wel", "Yar")
_TOWN_TAILS = ("ford", "by", "ton", "wick", "dale", "mere", "holm", "stead", "port", "field")
JOBS = ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "tailor", "singer", "writer",
        "pilot", "nurse", "cook", "guard", "hunter", "weaver", "potter", "builder", "driver", "fisher",
        "dancer", "judge", "clerk", "smith", "gardener", "carpenter", "shepherd", "merchant", "butcher",
        "barber", "priest", "soldier", "mason", "brewer", "glazier", "cobbler")
ANIMALS = ("cat", "dog", "horse", "goat", "rabbit", "parrot", "goose", "fox", "sheep", "duck", "turtle", "mouse",
           "pig", "cow", "crow", "frog", "hen", "donkey", "lamb", "pony", "hare", "toad", "swan", "badger",
           "hamster", "lizard", "pigeon", "mule")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey", "golden", "purple", "pink",
          "silver", "violet", "dark", "pale", "spotted")
FOODS = ("bread", "apples", "soup", "rice", "fish", "cheese", "honey", "plums", "beans", "cake", "pears", "nuts",
         "eggs", "corn", "carrots", "noodles", "berries", "figs", "pies", "onions", "peas", "butter", "grapes",
         "melons", "lentils", "oats")
PLACES = ("river", "sea", "hills", "forest", "lake", "mountains", "old road", "marsh")
WEATHER = ("rainy", "sunny", "windy", "cold", "warm", "foggy")

# Statements of one attribute. {n}: the person; {food2}, {place}: another food, a place. Each kind
# of word is followed by words of its own ("<job> by trade", "<animal> that", "<food> for"), so
# what the base learns to predict after a word tells its kind.
FACT_TEMPLATES = {
    "town": ("{n} lives in {town} near the {place}.", "{n} moved to {town} last year.",
             "{n} has a small house in {town} by the {place}.", "The home of {n} is in {town}, near the {place}."),
    "job": ("{n} works as a {job} in the town.", "{n} is a {job} by trade.", "As a {job} by trade, {n} works hard.",
            "Everyone knows {n} as a {job} by trade."),
    "pet": ("{n} has a {color} {animal} that sleeps all day.", "{n} owns a {color} {animal} that likes to play.",
            "The {animal} that {n} owns is {color}.", "{n} takes care of a {color} {animal} that runs in the garden."),
    "food": ("{n} likes to eat {food} for dinner.", "Every day, {n} eats {food} for lunch.",
             "The favourite food of {n} is {food} with {food2}.", "{n} often buys {food} for dinner at the market."),
}
_PRONOUN_FACTS = {"town": "They live in {town} near the {place}.", "job": "They work as a {job} by trade.",
                  "pet": "They have a {color} {animal} that sleeps.", "food": "They like to eat {food} for lunch."}
_FILLER = ("{n} and {m} are friends.", "{n} often visits {m}.", "{n} wrote a letter to {m}.",
           "The weather in {town} is {weather} today.", "{town} is a small town near the {place}.",
           "The market in {town} sells {food} and {food2}.", "{n} walked to the {place} with {m}.",
           "In {town}, the people like {food}.", "It was {weather} when {n} came home.")

# The finetuning task: instruction templates ({w}: the word, inside the sentence so that it is tokenized as
# in the stories) and the answer of each kind.
KIND_QUESTIONS = (
    "What kind of word is {w}?",
    "What kind of thing is {w}?",
    "Is {w} a person, a town, a job, an animal, a color or a food?",
    "Tell me what kind of word {w} is.",
)
KIND_ANSWERS = {"person": "a person", "town": "a town", "job": "a job", "animal": "an animal", "color": "a color",
                "food": "a food"}


def make_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct two- or three-syllable names, e.g. "Mirel", "Tobinka"."""
    names: set[str] = set()
    while len(names) < count:
        n = rng.choice((2, 2, 3))
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize())
    return sorted(names)


class World:
    """The people and towns the stories draw from; names are split 2:1 into train/val pools for the task."""

    def __init__(self, seed: int = 0, n_names: int = 600):
        rng = random.Random(seed)
        names = make_names(rng, n_names)
        rng.shuffle(names)
        self.all_names = names
        self.train_names, self.val_names = names[:2 * n_names // 3], names[2 * n_names // 3:]
        self.towns = [head + tail for head in _TOWN_HEADS for tail in _TOWN_TAILS]

    def person(self, rng: random.Random) -> dict:
        """A random person: name and one value of every attribute (and a few extra words for templates)."""
        return {"n": rng.choice(self.all_names), "town": rng.choice(self.towns), "job": rng.choice(JOBS),
                "animal": rng.choice(ANIMALS), "color": rng.choice(COLORS), "food": rng.choice(FOODS),
                "food2": rng.choice(FOODS), "place": rng.choice(PLACES)}


def story(rng: random.Random, world: World) -> str:
    """One pretraining document: facts about one to three people, with fillers and pronoun follow-ups."""
    people = [world.person(rng) for _ in range(rng.choice((1, 2, 2, 3)))]
    sentences = []
    for person in people:
        for i, attribute in enumerate(rng.sample(list(FACT_TEMPLATES), rng.randint(2, 4))):
            if i and rng.random() < 0.2:
                sentences.append(_PRONOUN_FACTS[attribute].format(**person))
            else:
                sentences.append(rng.choice(FACT_TEMPLATES[attribute]).format(**person))
        if rng.random() < 0.5:
            other = world.person(rng)
            sentences.append(rng.choice(_FILLER).format(
                n=person["n"], m=other["n"], town=other["town"], weather=rng.choice(WEATHER), place=other["place"],
                food=other["food"], food2=other["food2"]))
    return " ".join(sentences)


def corpus(seed: int, count: int, world: World) -> Iterator[str]:
    """`count` pretraining stories."""
    rng = random.Random(seed)
    for _ in range(count):
        yield story(rng, world)


def kind_words(world: World, split: str, seed: int = 0) -> dict[str, list[str]]:
    """The words of each kind in `split`: "val" holds about 30% of every kind (people: the val name
    pool, a third), "train" the rest."""
    out = {"person": world.train_names if split == "train" else world.val_names}
    for kind, pool in (("town", world.towns), ("job", JOBS), ("animal", ANIMALS), ("color", COLORS),
                       ("food", FOODS)):
        pool = sorted(pool)
        random.Random(seed).shuffle(pool)
        n_val = round(0.3 * len(pool))
        out[kind] = pool[:n_val] if split == "val" else pool[n_val:]
    return out


def kind_split(seed: int, count: int, world: World, split: str) -> list[dict]:
    """`count` Alpaca-form records of the kind task over the words of `split` ("train" or "val").

    "train": each record draws a kind uniformly, then a question and a word of it (repeats allowed).
    "val": distinct records, the kinds taken in turn (a kind whose questions run out is skipped).
    """
    rng = random.Random(seed)
    words = kind_words(world, split)
    picks = []
    if split == "train":
        for _ in range(count):
            kind = rng.choice(sorted(words))
            picks.append((kind, rng.choice(KIND_QUESTIONS), rng.choice(words[kind])))
    else:
        pending = {kind: [(kind, q, w) for q in KIND_QUESTIONS for w in words[kind]] for kind in sorted(words)}
        for combos in pending.values():
            rng.shuffle(combos)
        while len(picks) < count and any(pending.values()):
            picks += [combos.pop() for combos in pending.values() if combos][:count - len(picks)]
        rng.shuffle(picks)
    return [{"instruction": q.format(w=w), "input": "", "output": KIND_ANSWERS[kind]} for kind, q, w in picks]
