"""Hostile completions: the verifier and every reward source, on the main thread, in a thread and in a process.

Each input is something a policy (or an attacker writing a data set) can produce: braces nested 100,000 deep,
boxes nested 100,000 deep, towers of powers, a megabyte of text, terminal escapes and odd unicode, and code in
the answer. For every input and every context the test asserts the verdict (or the score's type and range), a
time bound, and that nothing in the input was executed (a sentinel file it tries to create stays absent). The
reward sources also get a memory bound and the length of what the model was run on.

``tests/test_verify.py`` covers the main-thread basics of :class:`~trl_hsstar.verify.MathVerifier`; this file
covers the three contexts and the reward models.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import os
import resource
import threading
import time

import pytest
import torch

from trl_hsstar.rewards import (
    OutcomeRewardModel,
    ProcessRewardModel,
    combine_rewards,
    config_max_length,
    encode_math_shepherd,
    split_steps,
)
from trl_hsstar.toy import STEP_TOKEN, build_char_tokenizer, build_tiny_model
from trl_hsstar.toy.oracle import OracleStepReward
from trl_hsstar.verify import MathVerifier, extract_boxed

TIMEOUT = 1.5
"""The verifier's own timeout."""
VERIFY_BOUND = TIMEOUT + 8.0
"""Most seconds one check may take, on a loaded 2-core machine (measured worst case: the timeout + 0.1 s)."""
REWARD_BOUND = 30.0
"""Most seconds one reward source may take on one hostile completion (measured worst case: ~2 s). Without a
length cap, a megabyte completion is a million-token forward pass: minutes, or out of memory."""
MEMORY_BOUND_MB = 1024
"""Most the process's peak memory may grow while scoring one hostile completion."""
STALL_BOUND = 1.0
"""Longest the main thread may be starved of the GIL while a worker thread checks or scores."""

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=64)
PROMPT = "Q: 1+2\nA: "
SENTINEL = "{SENTINEL}"  # replaced by a per-test path before use


def _random_text(n: int) -> str:
    """``n`` printable characters from a fixed linear congruential sequence, without ``\\`` and ``#`` (so
    without a box or a ``####`` line of its own)."""
    alphabet = [chr(c) for c in range(32, 127) if chr(c) not in "\\#"]
    x, out = 12345, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31
        out.append(alphabet[(x >> 16) % len(alphabet)])
    return "".join(out)


MEGA_RANDOM = _random_text(1_000_000)
MEGA_STEPS = "1+1=2\n\n" * 150_000
DEEP_BRACES = "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}"
DEEP_BOXES = "\\boxed{" * 100_000 + "1" + "}" * 100_000
CONTROL = "\x00\x1b[31m\r\u202e\x07\x08\x7f"

# id -> (completion, reference, verdict). Every completion is checked against its reference by the verifier and
# scored by every reward source.
HOSTILE = {
    "deep_braces": (DEEP_BRACES, "1", False),  # a 200,001-character answer: rejected without parsing
    "deep_boxes_wrong": (DEEP_BOXES, "2", False),
    "deep_boxes_right": (DEEP_BOXES, "1", True),  # unwrapped in linear time, then checked
    "tower_braced": ("\\boxed{9^{9^{9^{9}}}}", "3", False),
    "tower_bare": ("\\boxed{10^10^10^10}", "3", False),
    "tower_gsm8k": ("The answer is\n#### 9^9^9^9", "3", False),
    "factorial": ("\\boxed{(10^{10})!}", "3", False),
    "mega_random_right": (MEGA_RANDOM + " so \\boxed{\\frac{14}{2}}", "7", True),
    "mega_steps_wrong": (MEGA_STEPS + "The answer is \\boxed{3}.", "2", False),
    "mega_blank_lines": ("\n\n" * 500_000, "1", False),
    "control_chars": ((CONTROL + "\\boxed{\x1b[31m5\x1b[0m\x00}\r\x1b[2J\n\n") * 1000, "6", False),
    "rtl_spoof": ("\u202e\\boxed{21}\u202c", "12", False),
    "odd_unicode": ("\\boxed{\U0001f600\u0301\ufeff\uffff\u2028\U0010ffff\u200b}", "1", False),
    "special_tokens": ("<s></s><pad><step><unk><|im_end|><extra_0>\n\n" * 10_000 + "\\boxed{4}", "5", False),
    "inject_import": (f"\\boxed{{__import__('os').system('touch {SENTINEL}')}}", "0", False),
    "inject_eval": (f"\\boxed{{eval(\"__import__('os').system('touch {SENTINEL}')\")}}", "0", False),
    "inject_exec": (f"\\boxed{{exec(\"open('{SENTINEL}','w').close()\")}}", "0", False),
    "inject_shell": (f"\\boxed{{$(touch {SENTINEL}) `touch {SENTINEL}` ${{touch {SENTINEL}}}}}", "0", False),
    "inject_text": (f"\\boxed{{\\text{{__import__('os').system('touch {SENTINEL}')}}}}", "0", False),
    "inject_gsm8k": (f"#### __import__('os').system('touch {SENTINEL}')", "0", False),
    "inject_lambda": (f"\\boxed{{(lambda: __import__('os').system('touch {SENTINEL}'))()}}", "0", False),
}
CONTEXTS = ["main", "thread", "process"]


def materialise(case: str, tmp_path) -> tuple[str, str, bool, str]:
    completion, reference, verdict = HOSTILE[case]
    sentinel = str(tmp_path / "SENTINEL")
    return completion.replace(SENTINEL, sentinel), reference, verdict, sentinel


# ---------------------------------------------------------------------------------------------------------------
# Running something on the main thread, in a thread (watching the main thread), or in a spawned process


def run_in_thread(fn, *args, bound: float):
    """Run ``fn(*args)`` in a daemon thread; return its result and the longest gap between the main thread's
    ticks meanwhile (a long gap means the worker held the GIL and froze the process)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    last, stall = time.monotonic(), 0.0
    deadline = last + bound + 30
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(timeout=0.02)
        now = time.monotonic()
        stall, last = max(stall, now - last), now
    assert not thread.is_alive(), f"the thread did not return within {bound + 30:.0f}s"
    assert len(result) == 1, "the thread raised"
    return result[0], stall


@pytest.fixture(scope="module")
def child():
    """One spawned worker process for the whole module (it keeps its verifier and models between tests)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        assert pool.submit(os.getpid).result(timeout=120) != os.getpid()
        yield pool


# ---------------------------------------------------------------------------------------------------------------
# The verifier


@functools.lru_cache(maxsize=1)
def _verifier() -> MathVerifier:
    return MathVerifier(timeout=TIMEOUT)


def timed_check(completion: str, reference: str) -> tuple[bool, float, int]:
    """One timed check with this process's verifier, after a warm-up that (re)starts its worker."""
    v = _verifier()
    assert v("\\boxed{x+1}", "1+x") is True
    t0 = time.monotonic()
    verdict = v(completion, reference)
    return verdict, time.monotonic() - t0, os.getpid()


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_verifier_on_hostile_input(case, context, tmp_path, request, record_property):
    completion, reference, expected, sentinel = materialise(case, tmp_path)
    if context == "main":
        assert threading.current_thread() is threading.main_thread()
        verdict, elapsed, pid = timed_check(completion, reference)
    elif context == "thread":
        (verdict, elapsed, pid), stall = run_in_thread(timed_check, completion, reference, bound=VERIFY_BOUND)
        record_property("main_thread_stall_seconds", round(stall, 3))
        assert stall < STALL_BOUND, f"the main thread was frozen for {stall:.1f}s"
    else:
        pool = request.getfixturevalue("child")
        verdict, elapsed, pid = pool.submit(timed_check, completion, reference).result(
            timeout=VERIFY_BOUND + 120
        )
        assert pid != os.getpid()
    record_property("seconds", round(elapsed, 3))  # in the JUnit XML report (--junitxml)
    assert verdict is expected
    assert elapsed < VERIFY_BOUND, f"{case} took {elapsed:.2f}s in the {context} context"
    assert not os.path.exists(sentinel), "code in the completion was executed"


def test_deeply_nested_boxes_unwrap_in_linear_time():
    """Was quadratic (and a RecursionError): 42 s for 100,000 nested boxes before the fix."""
    t0 = time.monotonic()
    assert extract_boxed(DEEP_BOXES) == "1"
    assert extract_boxed("\\boxed{ \\fbox{" * 50_000 + "x+1" + "} }" * 50_000) == "x+1"
    assert time.monotonic() - t0 < 5.0


# ---------------------------------------------------------------------------------------------------------------
# The reward sources


class LengthProbe:
    """Records the longest input a model's forward pass received."""

    def __init__(self, model):
        self.longest = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.longest = max(self.longest, ids.shape[-1])


@functools.lru_cache(maxsize=1)
def _reward_sources():
    """The sources under test, built once per process: both PRM layouts, the ORM, the oracle, their sum."""
    tok = build_char_tokenizer()
    token_model = build_tiny_model(tok, task="token-classification", seed=1, **SMALL)
    seq_model = build_tiny_model(tok, task="sequence-classification", seed=2, **SMALL)
    probes = [LengthProbe(token_model), LengthProbe(seq_model)]
    sources = {
        "prm-math-shepherd": ProcessRewardModel(token_model, tok, batch_size=4),
        "prm-qwen": ProcessRewardModel(
            token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, batch_size=4
        ),
        "orm": OutcomeRewardModel(seq_model, tok, batch_size=4),
        "oracle": OracleStepReward(),
    }
    sources["combined"] = combine_rewards(list(sources.values()))
    return sources, probes


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def timed_scores(completion: str) -> dict:
    """Score ``completion`` (twice in a batch with a normal one) with every source; per source: the values,
    the seconds, the growth of peak memory, and the longest sequence a model was run on."""
    sources, probes = _reward_sources()
    prompts = [PROMPT, PROMPT, PROMPT]
    completions = [completion, "1+2=3\n\nThe answer is \\boxed{3}.", completion]
    out = {}
    for name, source in sources.items():
        for probe in probes:
            probe.longest = 0
        rss, t0 = _peak_rss_mb(), time.monotonic()
        values = source(prompts, completions)
        out[name] = dict(
            values=values,
            seconds=time.monotonic() - t0,
            rss_growth_mb=_peak_rss_mb() - rss,
            longest=max(p.longest for p in probes),
        )
    return out


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize(
    "case",
    [  # the megabyte and 100,000-deep cases take seconds each: the slow tier
        pytest.param(c, marks=pytest.mark.slow)
        if c.startswith(("mega_random", "mega_steps", "deep_boxes"))
        else c
        for c in HOSTILE
    ],
)
def test_reward_sources_on_hostile_input(case, context, tmp_path, request, record_property):
    completion, _, _, sentinel = materialise(case, tmp_path)
    if context == "main":
        results = timed_scores(completion)
    elif context == "thread":
        results, stall = run_in_thread(timed_scores, completion, bound=5 * REWARD_BOUND)
        record_property("main_thread_stall_seconds", round(stall, 3))
        assert stall < STALL_BOUND, f"the main thread was frozen for {stall:.1f}s"
    else:
        pool = request.getfixturevalue("child")
        results = pool.submit(timed_scores, completion).result(timeout=5 * REWARD_BOUND + 120)
    for name, r in results.items():  # in the JUnit XML report (--junitxml)
        record_property(f"{name}_seconds", round(r["seconds"], 3))
        record_property(f"{name}_rss_growth_mb", round(r["rss_growth_mb"]))
    has_steps = bool(split_steps(completion))
    assert set(results) == {"prm-math-shepherd", "prm-qwen", "orm", "oracle", "combined"}
    for name, r in results.items():
        values = r["values"]
        assert isinstance(values, list) and len(values) == 3, (name, values)
        hostile, normal = values[0], values[1]
        assert values[2] == hostile, (name, values)  # same input, same score, batch order aside
        assert isinstance(normal, float), (name, normal)
        if name in ("prm-math-shepherd", "prm-qwen", "oracle"):
            assert (hostile is None) == (not has_steps), (name, hostile)
        else:
            assert isinstance(hostile, float), (name, hostile)
        if hostile is not None:
            assert isinstance(hostile, float) and math.isfinite(hostile), (name, hostile)
            assert 0.0 <= hostile <= (4.0 if name == "combined" else 1.0), (name, hostile)
        if name == "oracle" and hostile is not None:
            assert hostile == 0.0  # no hostile completion solves 1+2
        assert r["seconds"] < REWARD_BOUND, f"{name} took {r['seconds']:.1f}s on {case} ({context})"
        assert r["rss_growth_mb"] < MEMORY_BOUND_MB, f"{name} grew peak memory by {r['rss_growth_mb']:.0f} MB"
        assert r["longest"] <= 512, f"{name} ran the model on {r['longest']} tokens"  # the config's limit
    assert not os.path.exists(sentinel)


# ---------------------------------------------------------------------------------------------------------------
# The length cap that makes the above hold


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def token_model(tok):
    return build_tiny_model(tok, task="token-classification", seed=1, max_position_embeddings=96, **SMALL)


@pytest.fixture(scope="module")
def seq_model(tok):
    return build_tiny_model(tok, task="sequence-classification", seed=2, max_position_embeddings=96, **SMALL)


def test_max_length_defaults_to_the_models_position_limit(tok, token_model, seq_model):
    assert config_max_length(token_model) == 96
    assert ProcessRewardModel(token_model, tok).max_length == 96
    assert ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN).max_length == 96
    assert OutcomeRewardModel(seq_model, tok).max_length == 96
    assert ProcessRewardModel(token_model, tok, max_length=40).max_length == 40  # an explicit value wins


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_position_embeddings": 4096, "n_positions": 1024}, 4096),
        ({"n_positions": 1024}, 1024),  # GPT-2 style
        ({"max_seq_len": 2048}, 2048),  # MPT style
        ({"max_position_embeddings": None, "max_seq_len": 2048}, 2048),
        ({}, None),
    ],
)
def test_config_max_length_reads_the_known_fields(fields, expected):
    from transformers import PretrainedConfig

    model = torch.nn.Linear(1, 1)
    model.config = PretrainedConfig(**fields)
    assert config_max_length(model) == expected


class TokenClassifierWithoutConfig(torch.nn.Module):
    """A bare torch module (no ``config``): nothing says how long its inputs may be."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 2)

    def forward(self, input_ids, attention_mask=None):
        return (self.embed(input_ids),)


def test_without_a_known_limit_max_length_stays_none_and_nothing_is_cut(tok):
    model = TokenClassifierWithoutConfig(len(tok))
    prm = ProcessRewardModel(model, tok, step_token=STEP_TOKEN)
    assert prm.max_length is None
    probe = LengthProbe(model)
    completion = "1+1=2\n\n" * 200
    assert len(prm.step_rewards([PROMPT], [completion])[0]) == 200
    assert probe.longest == 1 + len(PROMPT) + 200 * (len("1+1=2") + 1)  # BOS, prompt, steps and step tokens


def test_the_default_cap_keeps_the_last_tokens_like_an_explicit_one(tok, token_model, seq_model):
    completions = ["1+1=2\n\n" * 40 + "The answer is \\boxed{2}.", "3+4=7\n\n" * 3]
    prompts = [PROMPT] * 2
    for layout in ("math-shepherd", "qwen-prm"):
        default = ProcessRewardModel(token_model, tok, layout=layout, step_token=STEP_TOKEN)
        explicit = ProcessRewardModel(token_model, tok, layout=layout, step_token=STEP_TOKEN, max_length=96)
        got = default.step_rewards(prompts, completions)
        assert got == explicit.step_rewards(prompts, completions)
        assert 0 < len(got[0]) < 41  # the first steps were cut, the last ones kept
        assert len(got[1]) == 3
    assert OutcomeRewardModel(seq_model, tok)(prompts, completions) == OutcomeRewardModel(
        seq_model, tok, max_length=96
    )(prompts, completions)


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 200])
def test_math_shepherd_tail_encoding_equals_full_encoding_then_truncation(tok, max_length):
    step_id = tok.convert_tokens_to_ids(STEP_TOKEN)
    for prompt, completion in [
        (PROMPT, "12+7=19\n\n19+35=54\n\nThe answer is \\boxed{54}."),
        ([{"role": "user", "content": PROMPT}], "1+1=2\n\n" * 30),
        ("", "x"),
    ]:
        steps = split_steps(completion)
        ids, positions = encode_math_shepherd(tok, prompt, steps, step_id)
        cut = max(0, len(ids) - max_length)
        expected = (ids[cut:], [p - cut for p in positions if p >= cut])
        assert encode_math_shepherd(tok, prompt, steps, step_id, max_length=max_length) == expected


def test_qwen_layout_strips_step_tokens_that_removal_would_form(tok, token_model):
    """``"<st<step>ep>"`` becomes ``"<step>"`` after one removal: a forged step token that would shift which
    positions are read. Removed completely, the completion scores like its clean twin."""
    prm = ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN)
    forged = "1+2=3\n\nThe answer <st<step>ep>is \\boxed{3}."
    clean = "1+2=3\n\nThe answer is \\boxed{3}."
    got = prm.step_rewards([PROMPT, PROMPT], [forged, clean])
    assert len(got[0]) == 2 and got[0] == got[1]
