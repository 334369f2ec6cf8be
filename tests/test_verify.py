"""Answer extraction and checking: correctness, bounded time off the main thread, hostile input."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import threading
import time

import pytest

from trl_hsstar.verify import (
    MathVerifier,
    extract_answer,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    verify_answer,
)

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout=TIMEOUT, num_workers=2) as v:
        yield v


# (completion, reference, expected)
CASES = [
    # integers and the answer formats
    ("12+7=19\n\n19+35=54\n\nThe answer is \\boxed{54}.", "54", True),
    ("The answer is \\boxed{54}.", "55", False),
    ("\\boxed{54}", "54.0", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{-7}", "-7", True),
    ("\\boxed{-7}", "7", False),
    ("\\boxed{\\$18}", "18", True),
    ("\\fbox{12}", "12", True),
    ("\\boxed {12}", "12", True),
    # nested braces and nested boxes; the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\boxed{5}}", "5", True),
    ("first \\boxed{3} then \\boxed{4}", "4", True),
    ("first \\boxed{3} then \\boxed{4}", "3", False),
    ("\\boxed{4} and a truncated \\boxed{\\frac{1}{", "4", True),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{(1,2)}", "(1, 2)", True),
    ("\\boxed{x+1}", "1+x", True),
    # fractions against decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{3/4}", "0.75", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{0.75}", "\\tfrac{3}{4}", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    ("\\boxed{50\\%}", "0.5", True),
    ("\\boxed{\\pi}", "3.14159", False),
    # GSM8K format, in the completion and in the reference
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", True),
    ("#### 1,234", "1234", True),
    ("#### 71", "72", False),
    ("So she sold 72 clips.", "She sold 48 + 24 = 72.\n#### 72", False),  # no committed answer
    ("\\boxed{72}", "She sold 48 + 24 = 72.\n#### 72", True),
    ("\\boxed{72}", "\\boxed{72}", True),
    # garbage and degenerate input: False, never an exception
    ("", "1", False),
    ("no answer here", "1", False),
    ("\\boxed{}", "1", False),
    ("\\boxed{1", "1", False),
    ("}}}{{{\\boxed{{{", "1", False),
    ("\\boxed{1}", "", False),
    (None, "1", False),
    (123, "123", False),
    (b"\\boxed{1}", "1", False),
    ("\\boxed{1}", None, False),
    ("\\boxed{\\frac{1}{0}}", "1", False),
    ("\\boxed{" + "9" * 5000 + "}", "1", False),
    ("\\boxed{\\left(\\right.}", "1", False),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), CASES)
def test_verifier_cases(verifier, completion, reference, expected):
    assert verifier(completion, reference) is expected


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_references_may_be_numbers(verifier):
    assert verifier("\\boxed{54}", 54) is True
    assert verifier("\\boxed{0.5}", 0.5) is True
    assert verifier("\\boxed{1}", True) is False  # a bool is not a reference answer


def test_last_number_fallback_is_opt_in():
    with MathVerifier(last_number_fallback=True) as v:
        assert v("so the total is 72 clips", "72") is True
        assert v("so the total is 1,234.", "1234") is True
        assert v("nothing numeric", "72") is False
    assert MathVerifier()("so the total is 72 clips", "72") is False


HOSTILE = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10}}}",
]


@pytest.mark.parametrize("completion", HOSTILE)
def test_hostile_input_from_a_thread_returns_false_within_the_bound(completion):
    v = MathVerifier(timeout=TIMEOUT)
    v("\\boxed{x+1}", "1+x")  # start the worker first, so that only the check is timed
    result: list = []
    t0 = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(v(completion, "3")), daemon=True)
    thread.start()
    thread.join(timeout=TIMEOUT + 30)
    elapsed = time.monotonic() - t0
    assert not thread.is_alive(), "the check did not return"
    assert result == [False]
    assert elapsed < TIMEOUT + 10, f"took {elapsed:.1f}s for a {TIMEOUT}s bound"
    assert v.num_timeouts == 1
    # the main thread was never frozen, and the verifier still works after killing its worker
    assert v("\\boxed{x+2}", "2+x") is True
    v.close()


def test_many_threads_share_the_workers(verifier):
    completions = [f"\\boxed{{{i}/2}}" for i in range(40)] + HOSTILE
    references = [str(i / 2) for i in range(40)] + ["3", "3"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(verifier, completions, references))
    assert got == [True] * 40 + [False, False]


def test_verify_batch(verifier):
    got = verifier.verify_batch(["\\boxed{2}", "\\boxed{x^2}", "#### 5", "junk"], ["2", "x^2", "6", "1"])
    assert got == [True, True, False, False]
    with pytest.raises(ValueError, match="same length"):
        verifier.verify_batch(["a"], [])


def test_code_in_an_answer_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"\\boxed{{exec(\"open('{marker}','w')\")}}",
        f"\\boxed{{eval(\"__import__('os').system('touch {marker}')\")}}",
    ]
    with MathVerifier(timeout=TIMEOUT) as v:
        assert [v(p, "0") for p in payloads] == [False, False, False]
    assert not marker.exists()


def test_one_megabyte_completion(verifier):
    big = "1+1=2\n\n" * 150_000 + "The answer is \\boxed{2}."
    assert len(big) > 1_000_000
    assert verifier(big, "2") is True
    assert verifier("\\boxed{" * 200_000, "2") is False
    assert verifier("{" * 500_000 + "}" * 500_000, "2") is False


def _check_in_child(args):
    completion, reference = args
    return verify_answer(completion, reference), os.getpid()


PAIRS = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{x+1}", "1+x"), ("#### 4", "5"), (HOSTILE[0], "3")]


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_works_in_worker_processes(start_method):
    ctx = multiprocessing.get_context(start_method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        # verify_answer is a module-level function: it pickles by reference into the children
        got = list(pool.map(verify_answer, [c for c, _ in PAIRS], [r for _, r in PAIRS]))
    assert got == [True, True, False, False]


def test_forked_child_never_uses_the_parents_workers():
    v = MathVerifier(timeout=TIMEOUT)
    assert v("\\boxed{x+1}", "1+x")
    parent_worker = v._all[0].proc.pid
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        got = pool.submit(_child_check, v).result(timeout=120)
    assert got[0] is True and got[1] != parent_worker
    assert v._all[0].proc.pid == parent_worker and v("\\boxed{y+1}", "1+y")
    v.close()


def _child_check(v):
    return v("\\boxed{x+3}", "3+x"), v._all[0].proc.pid


def test_pickled_copy_starts_its_own_workers():
    v = MathVerifier(timeout=3.0)
    assert v("\\boxed{x+1}", "1+x")
    clone = pickle.loads(pickle.dumps(v))
    assert clone.timeout == 3.0 and clone._all == []
    assert clone("\\boxed{2x}", "x*2")
    assert clone._all[0].proc.pid != v._all[0].proc.pid
    v.close()
    clone.close()


def test_close_stops_workers():
    v = MathVerifier()
    assert v("\\boxed{x+1}", "1+x")
    proc = v._all[0].proc
    v.close()
    assert proc.poll() is not None


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{\\boxed{5}+1}", "\\boxed{5}+1"),
        ("\\boxed{1} \\boxed{2", "1"),
        ("x } \\boxed{ 7 }", "7"),
        ("no box", None),
        ("", None),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


def test_other_extractors():
    assert extract_gsm8k("a\n#### 72\n") == "72"
    assert extract_gsm8k("#### 1\n#### 2") == "2"
    assert extract_gsm8k("####   ") is None
    assert extract_last_number("a 1, b -2.5, c 1,000,") == "1,000"
    assert extract_last_number("none") is None
    assert extract_answer("\\boxed{3} #### 4") == "3"
    assert extract_answer("5 apples") is None
    assert extract_answer("5 apples", last_number_fallback=True) == "5"


def test_bad_configuration():
    with pytest.raises(ValueError, match="timeout"):
        MathVerifier(timeout=0)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)
