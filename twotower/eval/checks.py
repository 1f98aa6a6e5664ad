"""Scoring a reply against a task's check.

contains  the answer (or any of a list) appears, case-insensitively, whitespace-normalised
exact     the stripped reply equals the answer (or any of a list)
regex     re.search(answer, reply) matches (put (?i) in the pattern for case-insensitive)
count>=N  at least N matches of the answer regex; with no answer, at least N list items
          (lines starting with -, *, a bullet, or a number with . or ))
python    the reply's code (its first fenced block, else the whole reply) followed by the
          answer's asserts exits 0 in a sandbox: separate process, no network, time limit
humaneval the reply's code completes a HumanEval problem (answer: [prompt, test, entry point])
          and the problem's tests pass in the same sandbox (see humaneval.py)
none      not scored (long-form writing: judged by perplexity and repetition instead)
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from twotower.eval.humaneval import program
from twotower.eval.tasks import Task

LIST_ITEM = r"(?m)^\s*(?:[-*•+]|\d+[.)])\s+\S"
FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)

# Second layer of the sandbox (the first is an empty network namespace where the OS allows
# one): every socket entry point of the standard library raises before user code runs.
NETWORK_GUARD = """\
import socket as _socket_module, _socket as _raw_socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the twotower python check")
for _m in (_socket_module, _raw_socket):
    for _name in ("socket", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "socketpair", "fromfd"):
        if hasattr(_m, _name):
            setattr(_m, _name, _no_network)
del _m, _name, _socket_module, _raw_socket, _no_network
"""


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _answers(answer) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer or [])


def extract_code(reply: str) -> str:
    fenced = FENCE.search(reply)
    return fenced.group(1) if fenced else reply


@dataclass
class PythonResult:
    passed: bool
    reason: str  # "ok", "failed", "timeout"


@functools.cache
def _network_namespace_prefix() -> tuple[str, ...]:
    """`unshare -rn` (new user + network namespace: no interfaces but a down loopback) where the
    OS allows it; empty where it does not (the in-process guard still applies)."""
    for prefix in (("unshare", "-rn"), ("unshare", "-n")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=5).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def _limit_resources(memory_bytes: int, cpu_seconds: int):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000_000, 10_000_000))

    return apply


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512) -> PythonResult:
    """Run code in a fresh isolated interpreter (-I -S), in a temporary directory, with no
    network, a memory cap and a wall-clock limit; the whole process group is killed on time-out."""
    with tempfile.TemporaryDirectory(prefix="twotower-check-") as workdir:
        script = os.path.join(workdir, "check.py")
        with open(script, "w") as f:
            f.write(NETWORK_GUARD + "\n" + code + "\n")
        cmd = [*_network_namespace_prefix(), sys.executable, "-I", "-S", script]
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir},
            preexec_fn=_limit_resources(memory_mb * 2**20, int(timeout) + 1),
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return PythonResult(False, "timeout")
    return PythonResult(rc == 0, "ok" if rc == 0 else "failed")


def score(task: Task, reply: str, python_timeout: float = 5.0) -> bool | None:
    """True / False for a checked task, None for check 'none'."""
    check = task.check
    if check == "none":
        return None
    if check == "contains":
        return any(_norm(a) in _norm(reply) for a in _answers(task.answer))
    if check == "exact":
        return any(reply.strip() == a.strip() for a in _answers(task.answer))
    if check == "regex":
        return any(re.search(p, reply) is not None for p in _answers(task.answer))
    if check.startswith("count>="):
        need = int(check.removeprefix("count>="))
        patterns = _answers(task.answer) or [LIST_ITEM]
        return max(len(re.findall(p, reply)) for p in patterns) >= need
    if check == "python":
        return run_python(extract_code(reply) + "\n\n" + "\n".join(_answers(task.answer)), python_timeout).passed
    if check == "humaneval":
        prompt, test, entry_point = task.answer
        return run_python(program(extract_code(reply), prompt, test, entry_point), python_timeout).passed
    raise ValueError(f"unknown check {check!r}")
