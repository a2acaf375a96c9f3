import json
import random

import pytest

from img_guidance.guidance.questions import QUESTIONS, choose_question, fill, load_questions


def test_one_hundred_distinct_templates_each_with_one_placeholder():
    assert len(QUESTIONS) == 100
    assert len({q.strip().lower() for q in QUESTIONS}) == 100
    for question in QUESTIONS:
        assert question.count("{prompt}") == 1, question
        # no other braces, so str.format-style tools would not trip on them either
        assert question.replace("{prompt}", "").count("{") == 0, question


def test_fill_keeps_braces_in_the_prompt():
    assert fill("Fix it: {prompt}?", "a {red} cube and {prompt}") == "Fix it: a {red} cube and {prompt}?"
    assert fill(QUESTIONS[0], "a cat") == QUESTIONS[0].replace("{prompt}", "a cat")


def test_choice_is_a_function_of_seed_and_index():
    assert choose_question(7) == choose_question(7, index=0)
    assert [choose_question(s, i) for s in range(20) for i in range(3)] == [
        choose_question(s, i) for s in range(20) for i in range(3)
    ]
    by_seed = {choose_question(seed) for seed in range(60)}
    assert len(by_seed) >= 30  # 60 draws from 100 templates: clearly spread, not constant
    by_index = {choose_question(3, index) for index in range(30)}
    assert len(by_index) >= 15


def test_choice_leaves_the_global_random_state_alone():
    random.seed(123)
    state = random.getstate()
    choose_question(5, 2)
    assert random.getstate() == state


def test_choice_from_a_custom_list():
    questions = ("A {prompt}", "B {prompt}")
    picks = {choose_question(seed, questions=questions) for seed in range(20)}
    assert picks == set(questions)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(seed="1"), TypeError, "seed must be an integer"),
        (dict(seed=True), TypeError, "seed must be an integer"),
        (dict(seed=1, index=-1), ValueError, "index must be a non-negative integer, got -1"),
        (dict(seed=1, questions=()), ValueError, "empty"),
    ],
)
def test_choice_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        choose_question(**kwargs)


def test_load_questions_round_trip(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(["What about {prompt}?", "Fix {prompt}."]))
    assert load_questions(path) == ("What about {prompt}?", "Fix {prompt}.")
    assert load_questions(str(path)) == ("What about {prompt}?", "Fix {prompt}.")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[]", "empty list"),
        ('{"q": "x {prompt}"}', "must hold a JSON list"),
        ('["ok {prompt}", 3]', r"entry 1 is not a string: 3"),
        ('["ok {prompt}", "no placeholder"]', r"entry 1 has no \{prompt\} placeholder: 'no placeholder'"),
        ("[not json", "not valid JSON"),
    ],
)
def test_load_questions_errors_name_the_file_and_entry(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_questions(path)
    assert str(path) in str(info.value)


def test_load_questions_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "absent.json")
