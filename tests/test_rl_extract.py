import pytest

from regretless.rl.extract import answers_match, extract_answer, parse_number


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7", "7"),
    ("The total is \\boxed{42}. Then 3 more.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("work...\n#### 1,234 apples\n", "1,234"),
    ("The answer is 70.", "70"),
    ("The answer is: $5", "5"),
    ("answer = -3.5 because", "-3.5"),
    ("4 - 1 - 7 = -4", "-4"),
    ("5-3", "3"),
    ("I have 12 apples", "12"),
    ("half is 3/4", "3/4"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s,value", [
    ("1,234", 1234.0), ("$5", 5.0), ("12 apples", 12.0), ("-3.5", -3.5), ("3/4", 0.75), ("−2", -2.0),
    ("40%", 40.0), ("\\frac{1}{4}", 0.25), ("7.", 7.0), ("x = 7", None), ("abc", None), ("1/0", None),
])
def test_parse_number(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize("pred,gold,ok", [
    ("1,234", "1234", True), ("$5", "5", True), ("5.0", "5", True), ("0.5", "1/2", True),
    ("12 apples", "12", True), ("-4", "4", False), ("Paris.", "paris", True), ("Lyon", "Paris", False),
    (None, "1", False), ("0.333", "1/3", False), ("0.33333333333", "1/3", True),
])
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_boxed_wins_over_later_numbers():
    assert answers_match(extract_answer("\\boxed{9} and step 10"), "9")
