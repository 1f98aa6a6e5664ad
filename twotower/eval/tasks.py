"""The built-in generative task suite and the JSONL format for other prompt sets.

Every task has a program-checkable answer (see checks.py), except long-form writing, which
is judged by perplexity under an independent model and by repetition. Prompts are written
for a small instruct model: short, explicit about the answer format, partly solvable by a
135M model so that a drop in quality shows.

JSONL format, one object per line:
    {"id": "...", "category": "...", "prompt": "...", "check": "contains|exact|regex|count>=N|python|none",
     "answer": "..." or ["...", ...], "max_new_tokens": 64 (optional)}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from twotower.config import TwoTowerError

CHECKS = ("contains", "exact", "regex", "python", "humaneval", "none")  # plus count>=N
DEFAULT_MAX_NEW_TOKENS = {"python": 160, "long-form": 192}


@dataclass(frozen=True)
class Task:
    id: str
    category: str
    prompt: str
    check: str
    answer: str | list[str] | None = None
    max_new_tokens: int = 64

    def validate(self) -> None:
        if not (self.check in CHECKS or re.fullmatch(r"count>=\d+", self.check)):
            raise TwoTowerError(f"task {self.id}: unknown check {self.check!r}; use {', '.join(CHECKS)} or count>=N")
        if self.check not in ("none",) and not self.check.startswith("count") and not self.answer:
            raise TwoTowerError(f"task {self.id}: check {self.check!r} needs an answer")
        if self.check == "regex":
            for pattern in [self.answer] if isinstance(self.answer, str) else self.answer:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise TwoTowerError(f"task {self.id}: bad regex {pattern!r}: {err}") from err


def load_prompts(path: str | Path) -> list[Task]:
    """Read a JSONL prompt set; every line is checked, and errors name the line."""
    tasks, seen = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TwoTowerError(f"{path}:{n}: not JSON: {err}") from err
        missing = {"id", "category", "prompt", "check"} - set(row)
        if missing:
            raise TwoTowerError(f"{path}:{n}: missing field(s) {sorted(missing)}")
        unknown = set(row) - {"id", "category", "prompt", "check", "answer", "max_new_tokens"}
        if unknown:
            raise TwoTowerError(f"{path}:{n}: unknown field(s) {sorted(unknown)}")
        max_new = row.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS.get(row["category"], 64))
        task = Task(str(row["id"]), row["category"], row["prompt"], row["check"], row.get("answer"), int(max_new))
        task.validate()
        if task.id in seen:
            raise TwoTowerError(f"{path}:{n}: duplicate id {task.id!r}")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise TwoTowerError(f"{path} holds no prompts")
    return tasks


def interleave_categories(tasks: list[Task]) -> list[Task]:
    """Interleave categories so the first N prompts cover them all."""
    by_cat: dict[str, list[Task]] = {}
    for t in tasks:
        by_cat.setdefault(t.category, []).append(t)
    out, depth = [], max(len(v) for v in by_cat.values())
    for i in range(depth):
        out += [v[i] for v in by_cat.values() if i < len(v)]
    return out


# ------------------------------------------------------------------ the built-in suite
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("England", "London"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
]
FACTS = [
    ("How many days are there in a week?", r"\b(7|seven)\b"),
    ("How many legs does a spider have?", r"\b(8|eight)\b"),
    ("What color is the sky on a clear day?", r"(?i)blue"),
    ("What is the largest planet in our solar system?", r"(?i)jupiter"),
    ("What gas do plants absorb from the air?", r"(?i)carbon dioxide|CO2"),
    ("What is the chemical symbol for water?", r"H2O|H₂O"),
    ("How many continents are there on Earth?", r"\b(7|seven)\b"),
    ("What is the boiling point of water in degrees Celsius?", r"\b100\b"),
    ("Which planet is known as the Red Planet?", r"(?i)mars"),
    ("How many hours are in a day?", r"\b(24|twenty-four)\b"),
    ("What is the freezing point of water in degrees Celsius?", r"\b(0|zero)\b"),
    ("Who wrote the play Romeo and Juliet?", r"(?i)shakespeare"),
    ("What is the closest star to the Earth?", r"(?i)\bsun\b"),
    ("How many months are in a year?", r"\b(12|twelve)\b"),
    ("What animal is known as the king of the jungle?", r"(?i)lion"),
]
ARITHMETIC = [
    (2, "+", 3),
    (7, "+", 5),
    (12, "+", 7),
    (9, "+", 9),
    (15, "+", 6),
    (23, "+", 14),
    (40, "+", 25),
    (8, "-", 3),
    (10, "-", 4),
    (20, "-", 7),
    (15, "-", 9),
    (50, "-", 20),
    (3, "*", 4),
    (5, "*", 6),
    (7, "*", 8),
    (2, "*", 9),
    (10, "*", 10),
    (6, "*", 7),
    (11, "+", 11),
    (100, "+", 50),
    (18, "/", 3),
    (20, "/", 5),
    (9, "-", 9),
    (1, "+", 1),
    (4, "*", 5),
    (30, "+", 12),
    (25, "-", 5),
    (8, "*", 3),
    (14, "+", 28),
    (60, "/", 6),
]
SEQUENCES = [
    ("2, 4, 6, 8,", r"\b10\b"),
    ("1, 2, 3, 4, 5,", r"\b6\b"),
    ("5, 10, 15, 20,", r"\b25\b"),
    ("10, 20, 30, 40,", r"\b50\b"),
    ("1, 3, 5, 7,", r"\b9\b"),
    ("3, 6, 9, 12,", r"\b15\b"),
    ("100, 90, 80, 70,", r"\b60\b"),
    ("1, 4, 9, 16,", r"\b25\b"),
    ("2, 4, 8, 16,", r"\b32\b"),
    ("A, B, C, D,", r"\bE\b"),
    ("a, b, c, d, e,", r"(?i)\bf\b"),
    ("Monday, Tuesday, Wednesday,", r"(?i)thursday"),
    ("January, February, March,", r"(?i)april"),
    ("one, two, three, four,", r"(?i)five"),
    ("first, second, third,", r"(?i)fourth"),
    ("10, 9, 8, 7,", r"\b6\b"),
    ("0, 5, 10, 15,", r"\b20\b"),
    ("spring, summer, autumn,", r"(?i)winter"),
    ("11, 22, 33, 44,", r"\b55\b"),
    ("1, 1, 2, 3, 5, 8,", r"\b13\b"),
]
SENTENCES = [
    "The cat sat on the mat.",
    "I like green apples.",
    "The sun rises in the east.",
    "Water is wet.",
    "Birds can fly high.",
    "My dog is very happy.",
    "We went to the beach.",
    "Reading books is fun.",
    "The train leaves at noon.",
    "Snow is cold and white.",
]
WORDS_UPPER = ["apple", "river", "house", "music", "garden"]
LISTS = [
    ("three colors", 3),
    ("three fruits", 3),
    ("four animals", 4),
    ("three countries", 3),
    ("five vegetables", 5),
    ("three sports", 3),
    ("four musical instruments", 4),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small|little"),
    ("up", "down"),
    ("happy", "sad|unhappy"),
    ("fast", "slow"),
    ("day", "night"),
    ("open", "close|shut"),
    ("light", "dark|heavy"),
    ("old", "new|young"),
    ("empty", "full"),
]
PLURALS = [
    ("child", "children"),
    ("mouse", "mice"),
    ("cat", "cats"),
    ("box", "boxes"),
    ("man", "men"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("book", "books"),
]
FIRST_LETTERS = [
    ("banana", "b"),
    ("elephant", "e"),
    ("orange", "o"),
    ("tiger", "t"),
    ("umbrella", "u"),
    ("kite", "k"),
    ("lemon", "l"),
]
PYTHON = [
    ("add(a, b)", "returns the sum of a and b", "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
    ("square(x)", "returns x squared", "assert square(3) == 9\nassert square(-4) == 16"),
    ("is_even(n)", "returns True if n is even and False otherwise", "assert is_even(4) is True\nassert is_even(7) is False"),
    ("maximum(a, b)", "returns the larger of a and b", "assert maximum(3, 9) == 9\nassert maximum(5, 2) == 5"),
    ("reverse_string(s)", "returns the string s reversed", "assert reverse_string('abc') == 'cba'"),
    ("list_sum(xs)", "returns the sum of a list of numbers", "assert list_sum([1, 2, 3]) == 6\nassert list_sum([]) == 0"),
    (
        "count_vowels(s)",
        "returns how many vowels (a, e, i, o, u) the lowercase string s contains",
        "assert count_vowels('hello') == 2\nassert count_vowels('sky') == 0",
    ),
    ("factorial(n)", "returns n factorial", "assert factorial(5) == 120\nassert factorial(0) == 1"),
    ("multiply(a, b)", "returns the product of a and b", "assert multiply(3, 4) == 12"),
    ("is_positive(x)", "returns True if x is greater than zero", "assert is_positive(5)\nassert not is_positive(-2)"),
    ("first_element(xs)", "returns the first element of the list xs", "assert first_element([7, 8, 9]) == 7"),
    ("last_element(xs)", "returns the last element of the list xs", "assert last_element([7, 8, 9]) == 9"),
    ("to_upper(s)", "returns the string s in uppercase", "assert to_upper('abc') == 'ABC'"),
    ("average(xs)", "returns the average of a non-empty list of numbers", "assert average([2, 4, 6]) == 4"),
    (
        "fibonacci(n)",
        "returns the n-th Fibonacci number with fibonacci(0) == 0 and fibonacci(1) == 1",
        "assert fibonacci(0) == 0\nassert fibonacci(1) == 1\nassert fibonacci(10) == 55",
    ),
    (
        "celsius_to_fahrenheit(c)",
        "converts a temperature from Celsius to Fahrenheit",
        "assert celsius_to_fahrenheit(0) == 32\nassert celsius_to_fahrenheit(100) == 212",
    ),
    (
        "is_palindrome(s)",
        "returns True if the string s reads the same backwards",
        "assert is_palindrome('racecar')\nassert not is_palindrome('hello')",
    ),
    ("min_of_list(xs)", "returns the smallest number in the list xs", "assert min_of_list([4, 2, 8]) == 2"),
    ("word_count(s)", "returns the number of words in the string s", "assert word_count('a b c') == 3"),
    ("double(x)", "returns two times x", "assert double(21) == 42"),
]
LONG_FORM = [
    "Write a short paragraph about the ocean.",
    "Describe your ideal weekend in a few sentences.",
    "Write a short story about a robot who learns to paint.",
    "Explain why exercise is good for health.",
    "Write a letter to a friend about a recent trip.",
    "Describe how to make a cup of tea.",
    "Write a short poem about autumn leaves.",
    "Explain what a computer does, for a child.",
    "Describe a busy city street in the morning.",
    "Write a short paragraph about the importance of sleep.",
    "Explain how plants grow from seeds.",
    "Write a short story about a lost dog finding its way home.",
    "Describe the benefits of reading books.",
    "Write a product description for a new water bottle.",
    "Explain why the seasons change during the year.",
]


def _op_word(op: str) -> str:
    return {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}[op]


def builtin_tasks() -> list[Task]:
    """165 chat prompts over 7 categories."""
    tasks: list[Task] = []

    def add(category, prompt, check, answer=None, max_new_tokens=None):
        n = sum(t.category == category for t in tasks) + 1
        max_new = max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(category, 64)
        tasks.append(Task(f"{category}-{n:03d}", category, prompt, check, answer, max_new))

    for country, capital in CAPITALS:
        add("facts", f"What is the capital of {country}?", "contains", capital)
    for question, pattern in FACTS:
        add("facts", question, "regex", pattern)
    for a, op, b in ARITHMETIC:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        add("arithmetic", f"What is {a} {_op_word(op)} {b}? Answer with the number.", "regex", rf"(?<![\d.]){value}(?!\d|\.\d)")
    for seq, pattern in SEQUENCES:
        add("sequence", f"What comes next in this sequence: {seq} ...? Answer with the next item only.", "regex", pattern)
    for sentence in SENTENCES:
        add("copy-format", f"Repeat this sentence exactly, and nothing else: {sentence}", "contains", sentence)
    for word in WORDS_UPPER:
        add("copy-format", f"Write the word '{word}' in capital letters.", "contains", word.upper())
    for what, n in LISTS:
        add("copy-format", f"List {what} as a bulleted list, one per line.", f"count>={n}")
    add("copy-format", "Write the numbers from 1 to 5 separated by commas.", "regex", r"1,\s*2,\s*3,\s*4,\s*5")
    add("copy-format", 'Reply with the word "yes" and nothing else.', "regex", r"(?i)^\W*yes\W*$")
    add("copy-format", "Write the word 'hello' three times.", "count>=3", r"(?i)hello")
    for word, opposite in OPPOSITES:
        add("word", f"What is the opposite of the word '{word}'? Answer with one word.", "regex", rf"(?i)\b({opposite})\b")
    for word, plural in PLURALS:
        add("word", f"What is the plural of the word '{word}'? Answer with one word.", "regex", rf"(?i)\b{plural}\b")
    for word, letter in FIRST_LETTERS:
        add(
            "word",
            f"What is the first letter of the word '{word}'? Answer with the letter.",
            "regex",
            rf"(?i)(\b|[\"']){letter}(\b|[\"'])",
        )
    for signature, behaviour, asserts in PYTHON:
        add("python", f"Write a Python function `{signature}` that {behaviour}. Reply with only the code.", "python", asserts)
    for prompt in LONG_FORM:
        add("long-form", prompt, "none")
    for task in tasks:
        task.validate()
    return tasks
