"""LoCoMo's official QA score, checked on hand-computed examples of every category rule, and the mean's error bars.

Stems used below (nltk PorterStemmer): running/runs -> run, counseling -> counsel, certification -> certif,
psychology -> psycholog; other words here are their own stems."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peft_locas.recall.metrics import (
    CATEGORIES,
    bootstrap_interval,
    locomo_f1,
    mean_with_stderr,
    normalize_answer,
    token_f1,
)


def test_categories_follow_the_data_readme():
    assert CATEGORIES == {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


def test_normalize_drops_commas_punctuation_articles_and_and():
    # commas go first, then lower-case, punctuation, the words a/an/the/and, and repeated whitespace
    assert normalize_answer("The Cat, and a Dog!") == "cat dog"
    assert normalize_answer("  An apple;\tthe   PEAR.  ") == "apple pear"
    assert normalize_answer("Theatre and band") == "theatre band"  # whole words only
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer(2022) == "2022"
    assert normalize_answer("") == ""


def test_token_f1_stems_and_counts_shared_tokens():
    assert token_f1("running", "runs") == 1.0  # run == run
    # prediction [i, went, run, yesterday], gold [run]: P = 1/4, R = 1, F1 = 2 * 0.25 / 1.25 = 0.4
    assert token_f1("I went running yesterday", "runs") == pytest.approx(0.4, abs=1e-12)
    # prediction [on, 7, may, 2023], gold [7, may, 2023]: P = 3/4, R = 1, F1 = 1.5 / 1.75 = 6/7
    assert token_f1("On 7 May, 2023", "7 May 2023") == pytest.approx(6 / 7, abs=1e-12)
    # articles and punctuation are ignored on both sides
    assert token_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    # bag of tokens: prediction [run, run], gold [run]: shared 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("runs runs", "run") == pytest.approx(2 / 3, abs=1e-12)
    assert token_f1("", "Paris") == 0.0
    assert token_f1("the", "a") == 0.0  # both empty after normalisation: nothing shared
    assert token_f1("London", "Paris") == 0.0


def test_multi_hop_averages_gold_parts_over_best_prediction_part():
    gold = "Psychology, counseling certification"  # parts [psycholog], [counsel, certif]
    # one prediction part: part 1 -> 1.0, part 2 -> 0.0; mean 0.5
    assert locomo_f1("psychology", gold, 1) == pytest.approx(0.5, abs=1e-12)
    # prediction parts [counsel], [psycholog]: gold part 1 -> max(0, 1) = 1; gold part 2 -> [counsel] vs
    # [counsel, certif]: P = 1, R = 1/2, F1 = 2/3; mean (1 + 2/3) / 2 = 5/6
    assert locomo_f1("counseling, psychology", gold, 1) == pytest.approx(5 / 6, abs=1e-12)
    # unsplit (a single-hop question) the same strings give [counsel, psycholog] vs three stems: P = 1, R = 2/3, 0.8
    assert locomo_f1("counseling, psychology", gold, 4) == pytest.approx(0.8, abs=1e-12)
    assert locomo_f1("Psychology, counseling certification", gold, 1) == 1.0


def test_open_domain_keeps_the_first_semicolon_part_of_the_gold():
    gold = "Psychology; she wants to help people"
    assert locomo_f1("psychology", gold, 3) == 1.0
    # as a temporal (plain F1) question the rationale counts: gold [psycholog, she, want, to, help, peopl],
    # prediction [psycholog]: P = 1, R = 1/6, F1 = (2/6) / (7/6) = 2/7
    assert locomo_f1("psychology", gold, 2) == pytest.approx(2 / 7, abs=1e-12)


def test_adversarial_needs_the_original_phrases():
    assert locomo_f1("No information available.", None, 5) == 1.0
    assert locomo_f1("That is NOT MENTIONED in the conversation", "yes", 5) == 1.0
    assert locomo_f1("The information is not available", None, 5) == 0.0  # not one of the two phrases
    assert locomo_f1("Yes, she did.", "Yes, she did.", 5) == 0.0  # the gold answer plays no part
    assert locomo_f1("", None, 5) == 0.0


def test_numeric_gold_answers_and_uncategorised_questions():
    assert locomo_f1("2022", 2022, 2) == 1.0
    # prediction [in, 2022], gold [2022]: P = 1/2, R = 1, F1 = 2/3
    assert locomo_f1("In 2022.", 2022, 2) == pytest.approx(2 / 3, abs=1e-12)
    assert locomo_f1("In 2022.", 2022, None) == locomo_f1("In 2022.", 2022, 4)
    assert locomo_f1("", "Paris", 4) == 0.0


def test_locomo_f1_errors():
    with pytest.raises(ValueError) as error:
        locomo_f1("x", "x", 6)
    assert str(error.value) == "locomo_f1: unknown LoCoMo category 6; expected one of 1-5 (see CATEGORIES)"
    with pytest.raises(ValueError) as error:
        locomo_f1("x", None, 4)
    assert str(error.value) == "locomo_f1: category 4 needs a gold answer, got None"
    with pytest.raises(TypeError) as error:
        locomo_f1(None, "x", 4)
    assert str(error.value) == "locomo_f1: the prediction must be a string, got NoneType"


def test_mean_with_stderr():
    # mean 2.5; sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; stderr sqrt(5/3) / 2
    mean, stderr = mean_with_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    assert mean_with_stderr([0.7]) == (0.7, 0.0)
    assert mean_with_stderr(x for x in (1.0, 1.0)) == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"^mean_with_stderr: no values; score at least one question$"):
        mean_with_stderr([])


def test_bootstrap_interval_is_seeded_and_matches_the_normal_interval():
    values = np.random.default_rng(1).random(400)
    low, high = bootstrap_interval(values)
    assert bootstrap_interval(values) == (low, high)
    assert bootstrap_interval(values, seed=1) != (low, high)
    mean, stderr = mean_with_stderr(values)
    # for 400 draws the bootstrap distribution of the mean is close to normal: mean -+ 1.96 stderr, within 15 %
    assert low < mean < high
    assert mean - low == pytest.approx(1.96 * stderr, rel=0.15)
    assert high - mean == pytest.approx(1.96 * stderr, rel=0.15)
    narrow = bootstrap_interval(values, level=0.5)
    assert low < narrow[0] < mean < narrow[1] < high
    assert bootstrap_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)
    assert bootstrap_interval([1.0]) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"values": []}, "bootstrap_interval: no values; score at least one question"),
        ({"values": [1.0], "level": 1.0}, "bootstrap_interval: level 1.0 is not in (0, 1); use e.g. 0.95"),
        ({"values": [1.0], "samples": 0}, "bootstrap_interval: samples 0 < 1; use e.g. 2000"),
    ],
)
def test_bootstrap_interval_errors(kwargs, message):
    with pytest.raises(ValueError) as error:
        bootstrap_interval(**kwargs)
    assert str(error.value) == message
