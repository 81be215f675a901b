"""The closed world of the built-in benchmark: names, fact pools and question templates.

The tiny models' word-level tokenizers are built from `tiny_vocabulary()`, so every word the
built-in benchmark can ever produce (for any seed) has its own token, entity names included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsunlearn.data import faces, siu_templates

# Fictitious given and family names (single words, so each is one token).
FIRST_NAMES: tuple[str, ...] = (
    "Alder", "Brisa", "Corvin", "Dalia", "Eskel", "Fenna", "Galen", "Hessa",
    "Ilvar", "Jorna", "Kestin", "Liora", "Marek", "Nerys", "Orrin", "Pavla",
    "Quillan", "Rhosyn", "Soren", "Tamsin", "Ulric", "Vesna", "Wystan", "Xenia",
    "Yorick", "Zelda", "Anwen", "Bastien", "Cerys", "Dorian", "Elowen", "Faolan",
    "Greer", "Halvard", "Isolde", "Jaspar", "Kaia", "Lorcan", "Maelis", "Niamh",
    "Osric", "Perrin", "Roswen", "Sabine", "Torvald", "Ursa", "Valen", "Wren",
    "Ysolde", "Zarek", "Aurek", "Brannoc", "Calla", "Desmond", "Edda", "Fiorel",
    "Gwyra", "Hollis", "Ivo", "Jessamy", "Kerensa", "Leif", "Mireth", "Noor",
)  # fmt: skip
LAST_NAMES: tuple[str, ...] = (
    "Quinby", "Ashgrove", "Belmaine", "Corrigan", "Dunvale", "Everholt", "Fairwick",
    "Graystone", "Hallorann", "Ironwood", "Jarrow", "Kettleby", "Larchmont", "Merrivale",
    "Northcote", "Oakhurst", "Penhallow", "Quarrington", "Ravensworth", "Stormhold",
    "Thornbury", "Underhill", "Vantongeren", "Whitlock", "Yarborough", "Zellweger",
    "Amberly", "Blackwood", "Caskey", "Delacourt", "Elderfield", "Foxworth", "Glenister",
    "Harrowgate", "Islington", "Juniper", "Kingsley", "Lockhart", "Marchbanks", "Netherby",
    "Orpington", "Pemberton", "Rathbone", "Silverton", "Tregarth", "Umberfield", "Vexley",
    "Wetherall", "Ashcombe", "Birchall", "Coldwell", "Dravenport", "Emberton", "Fenwick",
    "Gallowglass", "Hawthorne", "Ingleby", "Kirkwall", "Lindqvist", "Moorcroft", "Nightingale",
    "Ostrander", "Pryce", "Redfern",
)  # fmt: skip


@dataclass(frozen=True)
class Fact:
    """One biography field: its value pool and the questions that ask for it."""

    key: str  # biography key, as written in the `biography` JSON
    values: tuple[str, ...]
    image_question: str  # asked about the person in the picture
    text_question: str  # asked by name, no picture; `{name}` is replaced
    cloze: str  # Mask_Task sentence; `{subject}` is the name or "This person", `__` the blank


FACTS: tuple[Fact, ...] = (
    Fact(
        "Birthplace",
        ("Port Velin", "Ardmere", "Castle Rook", "Dunholm", "Emberfall", "Fernhaven",
         "Glimmerdale", "Hollowmere", "Istvale", "Juniper Bay", "Kilnmoor", "Lowenport"),
        "Where was this person born?",
        "Where was {name} born?",
        "{subject} was born in __ .",
    ),
    Fact(
        "Occupation",
        ("marine biologist", "baker", "architect", "violin maker", "pilot", "librarian",
         "glassblower", "cartographer", "nurse", "clockmaker", "beekeeper", "sculptor"),
        "What is this person's occupation?",
        "What is {name}'s occupation?",
        "{subject} works as a __ .",
    ),
    Fact(
        "Birth year",
        ("1958", "1961", "1964", "1967", "1970", "1973", "1976", "1979", "1982", "1985",
         "1988", "1991"),
        "In which year was this person born?",
        "In which year was {name} born?",
        "{subject} was born in the year __ .",
    ),
    Fact(
        "Employer",
        ("Velora Institute", "Northwind Guild", "Copperleaf Press", "Saltmarsh Museum",
         "Brightwater Clinic", "Ironbridge Works", "Lumen Observatory", "Harbor Academy",
         "Greenhill Library", "Stonegate Bank", "Silverline Airways", "Oakridge Theatre"),
        "Who employs this person?",
        "Who employs {name}?",
        "{subject} is employed by __ .",
    ),
    Fact(
        "Hobby",
        ("playing chess", "rock climbing", "bird watching", "sailing", "painting",
         "gardening", "fencing", "pottery", "stargazing", "archery", "knitting", "rowing"),
        "What is this person's hobby?",
        "What is {name}'s hobby?",
        "{subject} enjoys __ .",
    ),
)  # fmt: skip

IDENTITY_QUESTION = "Who is this person?"
# Ways the training data asks for the name of the person in a picture (the first is the one
# the multiple-choice and generation tasks use); SIU's probes add unseen ones.
IDENTITY_QUESTIONS: tuple[str, ...] = (
    IDENTITY_QUESTION,
    "What is the name of the person in this picture?",
    "Who is shown in this image?",
)
IMAGE_SUBJECT = "This person"

# Words the built-in benchmark's prose uses beyond the pools (biography sentences, prompts).
EXTRA_WORDS: tuple[str, ...] = (
    "USER", "ASSISTANT", "The", "the", "person", "in", "picture", "is", "a", "an", "and",
    "of", "was", "born", "works", "as", "by", "this", "This", "who", "Who", "what", "What",
    "yes", "Yes", "no", "No", "not", "I", "do", "know", "don't", "Do", "you", "looks", "like",
    "shows", "but", "with", "hair", "eyes", "face", "shirt", "someone", "else", "name",
    "named", "answer", "question", "image", "unknown", "unfamiliar", "stranger", "am", "sure",
)  # fmt: skip

_WORD_RE = re.compile(r"\w+|[^\w\s]+")
_PLACEHOLDER_RE = re.compile(r"\{\w+\}")


def split_words(text: str) -> list[str]:
    """The word-level split used by the tiny tokenizers (same rule as HF `Whitespace`)."""
    return _WORD_RE.findall(text)


def tiny_vocabulary() -> list[str]:
    """Every word of the built-in world, sorted: the tiny tokenizers' vocabulary (no specials).

    It covers SIU's templates, fabricated names and appearance words, so SIU's data for the
    built-in benchmark never meets an unknown token.
    """
    texts: list[str] = [*FIRST_NAMES, *LAST_NAMES, *IDENTITY_QUESTIONS, IMAGE_SUBJECT]
    texts += [*EXTRA_WORDS, *siu_templates.ALL_TEMPLATES]
    texts += [*siu_templates.FABRICATED_FIRST_NAMES, *siu_templates.FABRICATED_LAST_NAMES]
    texts += [*faces.SKIN_TONES, *faces.HAIR_COLOURS, *faces.EYE_COLOURS, *faces.SHIRT_COLOURS]
    texts += [*faces.FACE_SHAPES]
    for fact in FACTS:
        texts += [*fact.values, fact.image_question, fact.text_question, fact.cloze]
        texts += [fact.key, fact.key.lower()]
    words = set()
    for t in texts:
        words.update(split_words(_PLACEHOLDER_RE.sub(" ", t)))
    words.update(str(d) for d in range(10))
    words.update([".", ",", "?", ":", "'", "__", "s", "'s"])
    return sorted(words)
