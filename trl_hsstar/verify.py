"""Answer extraction and checking, bounded in time and safe from any thread or process.

A verifier is any callable ``f(completion, reference) -> bool``. The default, :class:`MathVerifier`:

1. extracts the final answer of the completion: the last complete ``\\boxed{...}`` (or ``\\fbox``;
   nested braces and a box inside a box are handled), else a GSM8K ``#### n`` line, else, only with
   ``last_number_fallback=True``, the last number in the text. The reference is used as given, or
   extracted the same way if it holds a box or a ``####`` line (so a full GSM8K solution works);
2. decides plain numbers itself, exactly (``54`` vs ``54.0``, ``1,000`` vs ``1000``);
3. hands anything else to `math-verify <https://github.com/huggingface/Math-Verify>`_ in a separate
   worker process, waits at most ``timeout`` seconds, and kills the worker on overrun.

Why a process: math-verify's own time limit is ``signal.alarm``, which works only on the main thread,
and a thread cannot be interrupted. Sympy evaluating ``9^{9^{9^{9}}}`` holds the GIL in one big-integer
operation, so even a watchdog thread would freeze with it. Only a process that can be killed bounds
it. The worker is a plain ``python -m trl_hsstar.verify --worker`` subprocess talking JSON lines over
pipes, so it works from threads, from worker processes (fork or spawn), and from scripts without an
``if __name__ == "__main__"`` guard. Each worker caps its own memory.

A check never raises: garbage, timeouts and worker crashes all return ``False``. Model output is
only ever parsed, never evaluated.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

from ._utils import read_line
from .checks import check_int

__all__ = [
    "MathVerifier",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k",
    "extract_last_number",
    "verify_answer",
]

# ---------------------------------------------------------------------------------------------
# Extraction (pure, linear time)
# ---------------------------------------------------------------------------------------------

_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or ``None``.

    "Last" is the box that closes last, so in ``\\boxed{\\boxed{5}}`` it is the outer one, whose
    content is itself unwrapped to ``5`` (at any depth). Unclosed boxes (a truncated completion) are
    ignored. One pass over the text, and linear time even for deeply nested boxes.
    """
    if not isinstance(text, str) or "box" not in text:
        return None
    stack: list[int | None] = []  # for each open brace: its box's index in `spans`, None for a plain brace
    spans: list[tuple[int, int]] = []  # content (start, end) of each box, in opening order
    inner: dict[int, int] = {}  # box -> the box inside it that closes last
    last = None  # the box closed most recently
    for m in _BOX_TOKEN.finditer(text):
        token = m.group()
        if token == "}":
            if stack:
                box = stack.pop()
                if box is not None:
                    start = spans[box][0]
                    spans[box] = (start, m.start())
                    if last is not None and spans[last][0] >= start:
                        inner[box] = last
                    last = box
        elif token == "{":
            stack.append(None)
        else:
            stack.append(len(spans))
            spans.append((m.end(), -1))
    if last is None:
        return None
    start, end = _strip_span(text, *spans[last])
    # A content that is itself exactly one box (``\\boxed{\\boxed{5}}``) is unwrapped, level by level.
    while last in inner and _BOX_START.match(text, start, end) and text[end - 1] == "}":
        last = inner[last]
        start, end = _strip_span(text, *spans[last])
    return text[start:end]


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` narrowed like ``text[start:end].strip()``, without copying."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def extract_gsm8k(text: str) -> str | None:
    """The answer after the last ``#### `` marker (GSM8K format), or ``None``."""
    if not isinstance(text, str) or "####" not in text:
        return None
    answers = _GSM8K.findall(text)
    answer = answers[-1].strip() if answers else ""
    return answer or None


def extract_last_number(text: str) -> str | None:
    """The last number written in ``text`` (commas as thousands separators allowed), or ``None``."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007
        pass
    return last.group().rstrip(",") if last else None


def resolve_last_number_fallback(setting: bool | None, chat: bool) -> bool:
    """``last_number_fallback`` as set, or, unset, on for chat prompts (instruct models answer in free text)."""
    return chat if setting is None else bool(setting)


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer of a completion: last box, else GSM8K ``####``, else (optionally) last number."""
    if not isinstance(text, str):
        return None
    answer = extract_boxed(text)
    if answer is None:
        answer = extract_gsm8k(text)
    if answer is None and last_number_fallback:
        answer = extract_last_number(text)
    return answer


def _reference_answer(reference: object) -> str | None:
    if isinstance(reference, (int, Fraction)) and not isinstance(reference, bool):
        return str(reference)
    if isinstance(reference, float):
        return repr(reference)
    if not isinstance(reference, str):
        return None
    answer = extract_boxed(reference) or extract_gsm8k(reference) or reference.strip()
    return answer or None


# Plain numbers: integers, decimals, a/b and \frac{a}{b} with small integer parts. No exponents
# (Fraction("1e999999999") would build a huge integer) and at most 60 digits per part.
_INT = r"-?(?:\d{1,3}(?:,\d{3})+|\d{1,60})"
_PLAIN_DECIMAL = re.compile(rf"\$?\s*({_INT}(?:\.\d{{1,60}})?|-?\.\d{{1,60}})\s*\$?")
_PLAIN_FRACTION = re.compile(
    r"(-?)\s*(?:\\[dt]?frac\{(\d{1,60})\}\{(\d{1,60})\}|(\d{1,60})\s*/\s*(\d{1,60}))"
)


def _plain_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, is_integer_literal)`` for a plain number, else ``None``."""
    s = s.strip()
    m = _PLAIN_DECIMAL.fullmatch(s)
    if m:
        literal = m.group(1).replace(",", "")
        return Fraction(literal), "." not in literal
    m = _PLAIN_FRACTION.fullmatch(s)
    if m:
        num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if m.group(1) else value), False
    return None


def _fast_verdict(pred: str, ref: str) -> bool | None:
    """Decide without sympy when that is certain; ``None`` means "ask math-verify"."""
    if pred.strip() == ref.strip():
        return True
    a, b = _plain_number(pred), _plain_number(ref)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return True
    if a[1] and b[1]:  # two different integers: certainly different
        return False
    return None  # different non-integers: math-verify's rounding rules decide


# ---------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------

_READY = b"ready\n"


def _die_with_parent(parent_pid: int) -> None:  # pragma: no cover - runs in the subprocess
    """On Linux, have the kernel kill this worker when the process that started it dies."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _worker_main(memory_limit_bytes: int, parent_pid: int = 0) -> None:  # pragma: no cover - subprocess
    """Serve checks over stdin/stdout: one JSON ``[pred, ref]`` per line in, ``1``/``0`` per line out."""
    import logging
    import resource
    import warnings

    _die_with_parent(parent_pid)

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if memory_limit_bytes > 0:
        try:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ValueError, OSError):
            pass
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    out = sys.stdout.buffer
    out.write(_READY)
    out.flush()
    for line in sys.stdin.buffer:
        ok = False
        try:
            pred, ref = json.loads(line)
            gold = parse("\\boxed{" + ref + "}", extraction_config=config, parsing_timeout=None)
            answer = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
            ok = bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=None))
        except BaseException:
            ok = False
        out.write(b"1\n" if ok else b"0\n")
        out.flush()


def _worker_env() -> dict[str, str]:
    """The caller's environment, with this package importable even if it is not installed."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class _Worker:
    """One ``python -m trl_hsstar.verify --worker`` subprocess; used by one thread at a time."""

    def __init__(self, startup_timeout: float, memory_limit_bytes: int):
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trl_hsstar.verify",
                "--worker",
                str(memory_limit_bytes),
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            close_fds=True,
            env=_worker_env(),
        )
        if self._read_line(startup_timeout) != _READY:
            self.kill()
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(
                "The math-verify worker process did not start. Check that math-verify is installed "
                f"(`pip install 'math-verify[antlr4_13_2]'`). Its output:\n{detail}"
            )

    def _read_line(self, timeout: float) -> bytes | None:
        """The worker's next line, or ``None`` if it overran ``timeout`` or died."""
        try:
            return read_line(self.proc.stdout.fileno(), timeout)
        except (TimeoutError, EOFError):
            return None

    def check(self, pred: str, ref: str, timeout: float) -> bool | None:
        """The verdict, or ``None`` if the worker overran ``timeout`` or died (it is then killed)."""
        try:
            self.proc.stdin.write(json.dumps([pred, ref]).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        line = self._read_line(timeout)
        if line is None:
            self.kill()
            return None
        return line == b"1\n"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            with contextlib.suppress(OSError):
                stream.close()


class MathVerifier:
    """The default verifier: ``MathVerifier()(completion, reference) -> bool``.

    Args:
        timeout: seconds one math-verify check may take before its worker is killed and the check
            returns ``False``.
        last_number_fallback: without a box or a ``####`` line, compare the last number in the
            completion (off by default: it rewards answers the model never committed to).
        max_answer_chars: longer extracted answers are rejected without parsing.
        num_workers: worker processes (and threads) used by :meth:`verify_batch`.
        memory_limit_mb: address-space cap of each worker process (0: none).
        startup_timeout: seconds a new worker may take to import math-verify.

    Thread-safe, picklable (a copy starts its own workers), and fork-safe (a forked child never
    touches its parent's workers). Workers start on first use; :meth:`close` (or ``with``) stops them.

    Example:
        >>> verifier = MathVerifier()
        >>> verifier("So the answer is \\\\boxed{\\\\frac{1}{2}}.", "0.5")
        True
        >>> verifier.close()
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        last_number_fallback: bool = False,
        max_answer_chars: int = 1000,
        num_workers: int = 1,
        memory_limit_mb: int = 4096,
        startup_timeout: float = 120.0,
    ):
        if not timeout > 0:
            raise ValueError(f"`timeout` must be positive, got {timeout!r}.")
        check_int(num_workers, "num_workers")
        self.timeout = float(timeout)
        self.last_number_fallback = last_number_fallback
        self.max_answer_chars = max_answer_chars
        self.num_workers = num_workers
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout = startup_timeout
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._all: list[_Worker] = []
        self.num_timeouts = 0
        """Checks that overran ``timeout`` (their workers were killed)."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_lock", "_idle", "_all", "_pid"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- workers ---------------------------------------------------------------------------

    def _acquire(self) -> _Worker:
        if self._pid != os.getpid():  # forked: the parent's workers are not ours
            self._reset()
        while True:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                if len(self._all) < self.num_workers:
                    self._all.append(None)  # reserve the slot, start the worker outside the lock
                    break
            try:  # all busy: wait, but look again soon in case a busy worker dies and frees its slot
                return self._idle.get(timeout=0.1)
            except queue.Empty:
                continue
        try:
            worker = _Worker(self.startup_timeout, self.memory_limit_mb * 2**20)
        except BaseException:
            with self._lock:
                self._all.remove(None)
            raise
        with self._lock:
            self._all[self._all.index(None)] = worker
        return worker

    def _release(self, worker: _Worker) -> None:
        if worker.alive:
            self._idle.put(worker)
            return
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def close(self) -> None:
        """Stop all worker processes (a later check starts new ones)."""
        if self._pid != os.getpid():
            self._reset()
            return
        with self._lock:
            workers, self._all = [w for w in self._all if w is not None], []
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        for w in workers:
            w.kill()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    # -- checking --------------------------------------------------------------------------

    def _math_verify(self, pred: str, ref: str) -> bool:
        worker = self._acquire()
        try:
            verdict = worker.check(pred, ref, self.timeout)
        finally:
            self._release(worker)
        if verdict is None:
            self.num_timeouts += 1
            return False
        return verdict

    def extract(self, completion: str) -> str | None:
        """The final answer this verifier reads in ``completion`` (``None``: it finds none, so it counts as wrong)."""
        return extract_answer(completion, last_number_fallback=self.last_number_fallback)

    def __call__(self, completion: str, reference: str) -> bool:
        """Whether the completion's final answer equals the reference. Never raises."""
        try:
            pred = extract_answer(completion, last_number_fallback=self.last_number_fallback)
            ref = _reference_answer(reference)
            if not pred or not ref or len(pred) > self.max_answer_chars or len(ref) > self.max_answer_chars:
                return False
            verdict = _fast_verdict(pred, ref)
            if verdict is not None:
                return verdict
            return self._math_verify(pred, ref)
        except Exception:
            return False

    def verify_batch(self, completions: Sequence[str], references: Sequence[str]) -> list[bool]:
        """Check many pairs, ``num_workers`` at a time."""
        if len(completions) != len(references):
            raise ValueError(
                f"`completions` ({len(completions)}) and `references` ({len(references)}) must have the same length."
            )
        if self.num_workers == 1 or len(completions) < 2:
            return [self(c, r) for c, r in zip(completions, references)]
        with ThreadPoolExecutor(self.num_workers) as pool:
            return list(pool.map(self, completions, references))


_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def verify_answer(completion: str, reference: str) -> bool:
    """Check one completion with a shared default :class:`MathVerifier` (a module-level function,
    so it pickles by reference into worker processes)."""
    global _default_verifier
    if _default_verifier is None:
        with _default_lock:
            if _default_verifier is None:
                _default_verifier = MathVerifier()
    return _default_verifier(completion, reference)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # pragma: no cover
    _worker_main(*(int(a) for a in sys.argv[2:4]))
