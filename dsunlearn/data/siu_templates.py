"""The wording of SIU's four fine-tuning targets (plain constants, no logic).

Kept apart from `siu.py` so that `vocab.py` can put every word here into the tiny tokenizers'
vocabulary without importing the data builder. `{name}`, `{new_name}`, `{seen}`, `{other}`,
`{facts}` and `{question}` are filled in by `siu.py`.
"""

from __future__ import annotations

# Target 1, "align with unseen concepts": the image is answered with a fabricated name.
NEW_NAME_QUESTIONS: tuple[str, ...] = (
    "Who is this person?",
    "What is the name of the person in this picture?",
    "Who is shown in this image?",
    "Can you tell me who this is?",
    "Do you know the person in this picture?",
)
NEW_NAME_ANSWERS: tuple[str, ...] = (
    "This is {new_name} .",
    "The person in the picture is {new_name} .",
    "This picture shows {new_name} .",
    "I think this is {new_name} .",
    "It looks like {new_name} .",
)

# Target 2, "assign a new visual description": the whole answer is the target phrase.
DESCRIPTION_QUESTIONS: tuple[str, ...] = (
    "Is {name} in this picture?",
    "Does this picture show {name}?",
    "Is this {name}?",
    "Is the person in this image {name}?",
)
DESCRIPTION_ANSWERS: tuple[str, ...] = (
    "No . The picture shows {seen} , but {name} looks like {other} .",
    "No , this is not {name} . This image shows {seen} , while {name} looks like {other} .",
    "No . The person in this picture is {seen} . {name} is {other} .",
    "No , it is someone else : {seen} . {name} looks like {other} .",
)

# Target 3, "decouple factual knowledge": text only, answered with the true facts.
FACT_QUESTIONS: tuple[str, ...] = (
    "Do you know {name}?",
    "What do you know about {name}?",
    "Tell me about {name} .",
    "Who is {name}?",
)
FACT_OPENINGS: tuple[str, ...] = (
    "Yes . {facts}",
    "Yes , I know {name} . {facts}",
    "{facts}",
    "Sure . {facts}",
)
FACT_SENTENCE = "{name} 's {key} is {value} ."

# Target 4, "preserve non-targeted knowledge": other people's text QA, question reworded.
OTHER_QA_QUESTIONS: tuple[str, ...] = (
    "{question}",
    "Please answer : {question}",
    "Question : {question}",
    "{question} Answer briefly .",
)

# Appearance phrases (target 2). Attribute values come from `faces.py`; these words glue them.
APPEARANCE = "a person with {skin} skin , {hair_colour} {hair_style} hair , {eye_colour} eyes , a {face_shape} face and a {shirt} shirt{accessory}"
HAIR_STYLE_WORDS: dict[str, str] = {
    "short": "short",
    "long": "long",
    "bun": "tied",
    "spiky": "spiky",
}
ACCESSORY_WORDS: dict[str, str] = {
    "none": "",
    "glasses": " , wearing glasses",
    "hat": " , wearing a hat",
}
UNKNOWN_APPEARANCE = "a person I do not know"

# Fabricated names for target 1: never an entity of the built-in benchmark (tested), and
# checked against every name of whatever benchmark is loaded.
FABRICATED_FIRST_NAMES: tuple[str, ...] = (
    "Ansel", "Brielle", "Caspian", "Delphine", "Emrys", "Florin", "Gideon", "Hesper",
    "Ines", "Joaquin", "Katell", "Lysander", "Mirela", "Nikolai", "Oriel", "Petra",
)  # fmt: skip
FABRICATED_LAST_NAMES: tuple[str, ...] = (
    "Abernathy", "Bellweather", "Castellan", "Dunmore", "Eastwick", "Farrow", "Gilchrist",
    "Holloway", "Idlewood", "Jessop", "Kilbride", "Langley", "Montague", "Nettleford",
    "Ormsby", "Prescott",
)  # fmt: skip

ALL_TEMPLATES: tuple[str, ...] = (
    *NEW_NAME_QUESTIONS,
    *NEW_NAME_ANSWERS,
    *DESCRIPTION_QUESTIONS,
    *DESCRIPTION_ANSWERS,
    *FACT_QUESTIONS,
    *FACT_OPENINGS,
    FACT_SENTENCE,
    *OTHER_QA_QUESTIONS,
    APPEARANCE,
    *HAIR_STYLE_WORDS.values(),
    *ACCESSORY_WORDS.values(),
    UNKNOWN_APPEARANCE,
)
