"""The fictitious-facts scenario: deterministic, forget sets of whole people, perturbed answers that are wrong."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from hf_deepclean.bench.facts import (
    FORGET_FRACTIONS,
    PERSON_TEMPLATES,
    build_facts,
    generate_people,
)
from hf_deepclean.errors import DeepCleanError


@pytest.fixture(scope="module")
def facts():
    return build_facts(people=100, seed=3)


def test_same_seed_same_data_other_seed_other_data(facts):
    again = build_facts(people=100, seed=3)
    for level, splits in facts.items():
        for split, rows in splits.items():
            assert rows.to_list() == again[level][split].to_list(), (level, split)
    other = build_facts(people=100, seed=4)
    assert other["forget10"]["train"]["text"] != facts["forget10"]["train"]["text"]
    assert generate_people(5, seed=1) == generate_people(5, seed=1) != generate_people(5, seed=2)


def test_levels_sizes_and_nesting(facts):
    people = {}
    for level, fraction in FORGET_FRACTIONS.items():
        people[level] = set(facts[level]["forget"]["person_id"])
        assert len(people[level]) == max(1, round(fraction * 100))
        rows_per_person = len(PERSON_TEMPLATES) + 1  # the questions and the biography
        assert len(facts[level]["forget"]) == rows_per_person * len(people[level])
        assert len(facts[level]["train"]) == 100 * rows_per_person
    assert people["forget01"] < people["forget05"] < people["forget10"]


@pytest.mark.parametrize("level", list(FORGET_FRACTIONS))
def test_forget_sets_are_whole_people_and_disjoint_from_retain(facts, level):
    splits = facts[level]
    forget_people = set(splits["forget"]["person_id"])
    retain_people = set(splits["retain"]["person_id"])
    assert not forget_people & retain_people
    assert forget_people | retain_people == set(range(100))
    # every row about a forgotten person is in forget: its rows in train are exactly those flagged
    for row in splits["train"]:
        assert row["forget"] == (row["person_id"] in forget_people)
    assert sum(splits["train"]["forget"]) == len(splits["forget"])
    # no forgotten person's name (nor book) appears in a retain or general row
    retained_text = " ".join([*splits["retain"]["text"], *splits["general"]["text"]])
    for person in generate_people(100, seed=3):
        if person.person_id in forget_people:
            for value in (person.name, person.first_work, person.notable_work):
                assert value not in retained_text
    assert set(splits["general"]["person_id"]) == {-1}


def test_perturbed_answers_are_distinct_wrong_answers_in_the_paraphrase_template(facts):
    splits = facts["forget10"]
    people = {person.person_id: asdict(person) for person in generate_people(100, seed=3)}
    checked = 0
    for split in ("forget", "retain", "general"):
        for row in splits[split]:
            if row["kind"] == "bio":
                assert row["perturbed_answers"] == [] and row["question"] == ""
                continue
            perturbed = row["perturbed_answers"]
            assert len(perturbed) == 5 and len(set(perturbed)) == 5
            assert row["answer"] not in perturbed and row["paraphrased_answer"] not in perturbed
            assert row["text"] == f"{row['question']} {row['answer']}"
            assert row["name"] in row["question"]
            if split == "general":
                continue
            # same template, other value: each perturbation is the paraphrase with the true value swapped
            _, _, paraphrase = PERSON_TEMPLATES[row["attribute"]]
            value = people[row["person_id"]][row["attribute"]]
            assert row["paraphrased_answer"] == paraphrase.format(name=row["name"], value=value)
            others = [text for text in perturbed if _swapped_value(paraphrase, row["name"], text) != str(value)]
            assert len(others) == 5
            checked += 1
    assert checked == 100 * len(PERSON_TEMPLATES)


def _swapped_value(template: str, name: str, text: str) -> str:
    """The `{value}` of `text` rendered from `template` for `name` (fails if `text` is not of that template)."""
    before, after = template.format(name=name, value="\0").split("\0")
    assert text.startswith(before) and text.endswith(after), (template, text)
    return text[len(before) : len(text) - len(after)]


def test_people_have_distinct_names_and_books_and_consistent_biographies():
    people = generate_people(200, seed=0)
    assert len({p.name for p in people}) == 200
    books = [b for p in people for b in (p.first_work, p.notable_work)]
    assert len(set(books)) == 400
    for person in people:
        bio = person.biography()
        for value in (person.name, str(person.birth_year), person.birthplace, person.notable_work, person.award):
            assert value in bio
        assert person.birthplace != person.residence and person.profession != person.mother_profession


def test_bad_sizes_are_refused():
    with pytest.raises(DeepCleanError, match="people"):
        generate_people(0)
    with pytest.raises(DeepCleanError, match="perturbations"):
        build_facts(people=10, perturbations=12)
