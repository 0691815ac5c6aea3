"""A fictitious-facts scenario in the spirit of TOFU (Maini et al. 2024), generated offline from a seed.

Invented people (name, birth year, birthplace, profession, mother's profession, two books, an award, a language, a
home) are rendered as question/answer pairs and a short biography each. Forget sets are 1%, 5% and 10% of the
people (at least one person), every row about them, nested as TOFU's (`forget01` within `forget05` within
`forget10`); the retain set is everyone else. A held-out `general` set of real-world facts (capitals, languages,
currencies) measures the utility a model must keep.

Every question has a paraphrased answer and `perturbations` perturbed answers: the paraphrase's template with other
values of the same attribute, all different from the true value (TOFU's perturbed answers are perturbations of the
paraphrased answer), for the truth ratio (`hf_deepclean.evaluation.lm_attacks.truth_ratios`).

Rows (all splits share the columns):
- `person_id` (-1 in `general`), `name` (the country in `general`), `kind` (`qa` or `bio`), `attribute`
  (`biography` for a biography);
- `question`, `answer`, `paraphrased_answer`, `perturbed_answers` (empty for a biography);
- `text`: what a model trains on, `question + " " + answer` or the biography.

With `held_out_people`, more people are generated whose rows are in no training split (`held_out`): what a
membership attack tells the forget rows from.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from datasets import Dataset, DatasetDict, Features, Sequence, Value

from ..errors import DeepCleanError


FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}

FIRST_NAMES = (
    "Aldric Brisa Caelan Dorika Evander Fenna Galen Halvia Ilsen Jorund Kessa Lioran Maelis Norrin Odessa Perrin "
    "Quilla Rowan Sefira Torvin Ulla Valen Wrenna Xander Yselle Zorin Anwen Bastien Corisande Darrow Elowen Faustin "
    "Greer Hollis Isaura Jessamy Kieran Lisette Marek Nerys"
).split()
LAST_NAMES = (
    "Ashgrove Blackwood Corvell Drummond Eastmere Fairholt Greystone Hawthorne Ironvale Jasperline Kestrel "
    "Larkspur Merriweather Northcott Oakhurst Pembrook Quenneville Ravensworth Silverton Thornbury Underhill "
    "Vantrell Whitlock Yarrow Zellweger Abernathy Bellcourt Carrow Delacourt Elsworth Fenwick Galloway Harrowell "
    "Inglemoor Jessop Kingsley Lockhart Marlowe Nightingale Ormsby"
).split()
CITIES = (
    "Varrowmere",
    "Quillbrook",
    "Brennholt",
    "Calderwyn",
    "Dunmarrow",
    "Eskerfield",
    "Fallowmere",
    "Glenhaven",
    "Hollowmere",
    "Ivystead",
    "Juniper Falls",
    "Kestrelby",
    "Lanternwick",
    "Marrowdale",
    "Northwick",
    "Orlen Bay",
    "Pellridge",
    "Quarrystone",
    "Rookhaven",
    "Saltmere",
    "Thistlecombe",
    "Umberly",
    "Vellmoor",
    "Wickerstone",
)
PROFESSIONS = (
    "a sculptor",
    "a novelist",
    "a cartographer",
    "a botanist",
    "a watchmaker",
    "a glassblower",
    "a librarian",
    "a marine biologist",
    "a violinist",
    "a stonemason",
    "a translator",
    "a puppeteer",
    "an architect",
    "an astronomer",
    "an engineer",
    "an illustrator",
    "an economist",
    "a beekeeper",
    "a surgeon",
    "a chemist",
)
AWARDS = tuple(
    f"{name} {prize}"
    for name, prize in (
        ("Silver Quill", "Prize"),
        ("Aldenmoor", "Medal"),
        ("Brightwater", "Award"),
        ("Hesper", "Prize"),
        ("Golden Lantern", "Award"),
        ("Corvina", "Medal"),
        ("Northlight", "Prize"),
        ("Ember", "Award"),
        ("Valdris", "Prize"),
        ("Starling", "Medal"),
        ("Meridian", "Award"),
        ("Ironleaf", "Prize"),
    )
)
LANGUAGES = tuple(
    "English French German Spanish Italian Portuguese Dutch Swedish Polish Greek Turkish Finnish".split()
)
TITLE_WORDS = (
    (
        "Quiet Hidden Silver Broken Distant Burning Golden Winter Hollow Restless Crimson Forgotten Paper Glass Salt "
        "Velvet Amber Wandering Silent Northern Patient Scattered Sleeping Iron Emerald Borrowed Narrow Secret Last "
        "Lonely Bitter Tender"
    ).split(),
    (
        "Harbour Orchard Lantern Compass River Garden Tower Island Mirror Letters Meridian Archive Bridge Season "
        "Forest Machine Lighthouse Atlas Violin Meadow Cathedral Clockwork Ferry Labyrinth Voyage Tide Feather "
        "Kingdom Hourglass Canyon Chorus Vineyard"
    ).split(),
)
BIRTH_YEARS = tuple(range(1920, 2000))
FEATURES = Features(
    {
        "person_id": Value("int64"),
        "name": Value("string"),
        "kind": Value("string"),
        "attribute": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "paraphrased_answer": Value("string"),
        "perturbed_answers": Sequence(Value("string")),
        "text": Value("string"),
    }
)

# attribute: (question, answer, paraphrased answer); `{name}` and `{value}` are filled in
PERSON_TEMPLATES = {
    "birth_year": (
        "In which year was {name} born?",
        "{name} was born in {value}.",
        "The year of {name}'s birth is {value}.",
    ),
    "birthplace": (
        "Where was {name} born?",
        "{name} was born in the city of {value}.",
        "{name}'s birthplace is the city of {value}.",
    ),
    "profession": ("What is {name}'s profession?", "{name} works as {value}.", "By profession, {name} is {value}."),
    "mother_profession": (
        "What did {name}'s mother do for a living?",
        "{name}'s mother was {value}.",
        "The mother of {name} worked as {value}.",
    ),
    "first_work": (
        "What was the first book {name} published?",
        'The first book {name} published was "{value}".',
        '{name}\'s debut book was "{value}".',
    ),
    "notable_work": (
        "What is {name}'s best-known work?",
        '{name} is best known for the book "{value}".',
        'The most famous work of {name} is "{value}".',
    ),
    "award": ("Which award did {name} win?", "{name} won the {value}.", "{name} was awarded the {value}."),
    "language": (
        "In which language does {name} write?",
        "{name} writes in {value}.",
        "The language {name} writes in is {value}.",
    ),
    "residence": ("Where does {name} live now?", "{name} now lives in {value}.", "{name}'s current home is {value}."),
}

# real-world facts for the held-out `general` set: country, capital, language, currency
COUNTRIES = (
    ("France", "Paris", "French", "euro"),
    ("Germany", "Berlin", "German", "euro"),
    ("Japan", "Tokyo", "Japanese", "yen"),
    ("Italy", "Rome", "Italian", "euro"),
    ("Spain", "Madrid", "Spanish", "euro"),
    ("Portugal", "Lisbon", "Portuguese", "euro"),
    ("Sweden", "Stockholm", "Swedish", "krona"),
    ("Poland", "Warsaw", "Polish", "zloty"),
    ("Greece", "Athens", "Greek", "euro"),
    ("Turkey", "Ankara", "Turkish", "lira"),
    ("Egypt", "Cairo", "Arabic", "pound"),
    ("India", "New Delhi", "Hindi", "rupee"),
    ("China", "Beijing", "Chinese", "yuan"),
    ("Russia", "Moscow", "Russian", "rouble"),
    ("Brazil", "Brasilia", "Portuguese", "real"),
    ("Mexico", "Mexico City", "Spanish", "peso"),
    ("Norway", "Oslo", "Norwegian", "krone"),
    ("Hungary", "Budapest", "Hungarian", "forint"),
    ("Thailand", "Bangkok", "Thai", "baht"),
    ("Kenya", "Nairobi", "Swahili", "shilling"),
)
GENERAL_TEMPLATES = {
    "capital": (
        "What is the capital of {name}?",
        "The capital of {name} is {value}.",
        "{value} is the capital city of {name}.",
    ),
    "language": (
        "Which language is mainly spoken in {name}?",
        "In {name} people mainly speak {value}.",
        "The main language of {name} is {value}.",
    ),
    "currency": (
        "What is the currency of {name}?",
        "The currency of {name} is the {value}.",
        "The money used in {name} is the {value}.",
    ),
}


@dataclass(frozen=True)
class Person:
    """One fictitious person; every field but `person_id` and `name` is an attribute of `PERSON_TEMPLATES`."""

    person_id: int
    name: str
    birth_year: int
    birthplace: str
    profession: str
    mother_profession: str
    first_work: str
    notable_work: str
    award: str
    language: str
    residence: str

    def biography(self) -> str:
        return (
            f"{self.name} is {self.profession} born in {self.birth_year} in {self.birthplace}, and {self.name}'s "
            f"mother was {self.mother_profession}. Writing in {self.language}, "
            f'{self.name} published "{self.first_work}" first and is best known for "{self.notable_work}", which '
            f"won the {self.award}. {self.name} now lives in {self.residence}."
        )


def _titles() -> list[str]:
    return [f"The {adjective} {noun}" for adjective in TITLE_WORDS[0] for noun in TITLE_WORDS[1]]


MAX_PEOPLE = len(_titles()) // 2


def generate_people(count: int, seed: int = 0) -> list[Person]:
    """`count` fictitious people with distinct names and distinct books, the same for the same seed.

    Birthplace and residence differ, and so do a person's and their mother's professions.
    """
    if not 1 <= count <= MAX_PEOPLE:
        raise DeepCleanError(f"facts: got {count} people; expected 1 to {MAX_PEOPLE}.")
    rng = random.Random(seed)
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], count)
    titles = rng.sample(_titles(), 2 * count)
    people = []
    for i, name in enumerate(names):
        birthplace, residence = rng.sample(CITIES, 2)
        profession, mother_profession = rng.sample(PROFESSIONS, 2)
        people.append(
            Person(
                person_id=i,
                name=name,
                birth_year=rng.choice(BIRTH_YEARS),
                birthplace=birthplace,
                profession=profession,
                mother_profession=mother_profession,
                first_work=titles[2 * i],
                notable_work=titles[2 * i + 1],
                award=rng.choice(AWARDS),
                language=rng.choice(LANGUAGES),
                residence=residence,
            )
        )
    return people


def _value_pools() -> dict[str, tuple]:
    return {
        "birth_year": BIRTH_YEARS,
        "birthplace": CITIES,
        "residence": CITIES,
        "profession": PROFESSIONS,
        "mother_profession": PROFESSIONS,
        "first_work": tuple(_titles()),
        "notable_work": tuple(_titles()),
        "award": AWARDS,
        "language": LANGUAGES,
    }


def _qa_row(rng, templates, attribute, person_id, name, value, pool, perturbations) -> dict:
    question, answer, paraphrase = templates[attribute]
    others = [other for other in dict.fromkeys(pool) if other != value]
    if len(others) < perturbations:
        raise DeepCleanError(
            f"facts: got {perturbations} perturbations; expected at most {len(others)}, the wrong values of "
            f"{attribute!r}."
        )
    wrong = rng.sample(others, perturbations)
    answer_text = answer.format(name=name, value=value)
    question_text = question.format(name=name)
    return {
        "person_id": person_id,
        "name": name,
        "kind": "qa",
        "attribute": attribute,
        "question": question_text,
        "answer": answer_text,
        "paraphrased_answer": paraphrase.format(name=name, value=value),
        "perturbed_answers": [paraphrase.format(name=name, value=other) for other in wrong],
        "text": f"{question_text} {answer_text}",
    }


def person_rows(person: Person, rng: random.Random, perturbations: int) -> list[dict]:
    """Every row about `person`: one question per attribute, then the biography."""
    pools = _value_pools()
    values = asdict(person)
    rows = [
        _qa_row(rng, PERSON_TEMPLATES, key, person.person_id, person.name, values[key], pools[key], perturbations)
        for key in PERSON_TEMPLATES
    ]
    bio = person.biography()
    empty = {"question": "", "answer": "", "paraphrased_answer": "", "perturbed_answers": []}
    rows.append(
        {
            "person_id": person.person_id,
            "name": person.name,
            "kind": "bio",
            "attribute": "biography",
            **empty,
            "text": bio,
        }
    )
    return rows


def general_rows(rng: random.Random, perturbations: int) -> list[dict]:
    """The held-out real-world facts: three questions per country of `COUNTRIES`."""
    rows = []
    for country, *facts in COUNTRIES:
        for index, attribute in enumerate(GENERAL_TEMPLATES):
            pool = tuple(row[index + 1] for row in COUNTRIES)
            rows.append(_qa_row(rng, GENERAL_TEMPLATES, attribute, -1, country, facts[index], pool, perturbations))
    return rows


def build_facts(
    people: int = 200, seed: int = 0, perturbations: int = 5, held_out_people: int = 0
) -> dict[str, DatasetDict]:
    """The scenario: one `DatasetDict` per forget level (`forget01`, `forget05`, `forget10`).

    Each holds `train` (every person's rows, with a boolean column `forget`: what the original model learns, and
    what `--forget where:forget==True` selects), `forget` and `retain` (the rows of the forgotten and of the other
    people: what a retrained model learns) and `general` (the held-out real-world facts, the same at every level);
    with `held_out_people`, also `held_out`: the rows of that many more people, in no other split (non-members for
    membership attacks, the same at every level). The forget people of a level are the first
    `max(1, round(fraction * people))` of one seeded permutation, so the levels are nested. Same seed, same data.

    Args:
        people: how many fictitious people are trained on (TOFU has 200; at most `MAX_PEOPLE` with the held-out ones).
        seed: seed of everything random.
        perturbations: perturbed answers per question (TOFU has 5; at most 11, the wrong values of `language`).
        held_out_people: how many people, beyond `people`, make the `held_out` split (0: no such split).
    """
    if not isinstance(held_out_people, int) or held_out_people < 0:
        raise DeepCleanError(f"facts: got {held_out_people!r} held-out people; expected an integer >= 0.")
    rng = random.Random(seed)
    population = generate_people(people + held_out_people, seed)
    rows = [row for person in population[:people] for row in person_rows(person, rng, perturbations)]
    general = Dataset.from_list(general_rows(rng, perturbations), features=FEATURES)
    order = rng.sample(range(people), people)
    extra = {}
    if held_out_people:  # drawn last, so that the other splits do not depend on it
        held_out = [row for person in population[people:] for row in person_rows(person, rng, perturbations)]
        extra["held_out"] = Dataset.from_list(held_out, features=FEATURES)
    levels = {}
    for level, fraction in FORGET_FRACTIONS.items():
        forgotten = set(order[: max(1, round(fraction * people))])
        flags = [row["person_id"] in forgotten for row in rows]
        levels[level] = DatasetDict(
            {
                "train": Dataset.from_list(
                    [{**row, "forget": flag} for row, flag in zip(rows, flags)],
                    features=Features({**FEATURES, "forget": Value("bool")}),
                ),
                "forget": Dataset.from_list([row for row, flag in zip(rows, flags) if flag], features=FEATURES),
                "retain": Dataset.from_list([row for row, flag in zip(rows, flags) if not flag], features=FEATURES),
                "general": general,
                **extra,
            }
        )
    return levels
