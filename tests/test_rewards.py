"""Tests for trl_hsstar.rewards: aggregation, the PRM layouts, the ORM, and the reward-callable helpers.

Expected values are computed independently of the code under test: token ids are built by hand from the char
tokenizer (one token per character), the tiny model is run once per example without padding, and the
probabilities are read at hand-picked positions.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_hsstar.rewards import (
    QWEN_PRM_SYSTEM_PROMPT,
    CombinedReward,
    OutcomeRewardModel,
    ProcessRewardModel,
    RewardSource,
    aggregate_step_rewards,
    as_reward_source,
    check_rewards,
    combine_rewards,
    reward_source_name,
    split_steps,
)
from trl_hsstar.toy import STEP_TOKEN, build_char_tokenizer, build_tiny_model

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=64)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "rewards.md"

PROMPTS = ["Q: 12+7+35\nA: ", "Q: 1+2\nA: ", "Q: 3+4+5+6\nA: ", "Q: 9+9\nA: ", "Q: 5+5\nA: "]
COMPLETIONS = [
    "12+7=19\n\n19+35=54\n\nThe answer is \\boxed{54}.",
    "1+2=3\n\nThe answer is \\boxed{3}.",
    "3+4=7\n\n  7+5=12  \n\n\n\n12+6=18\n\nThe answer is \\boxed{18}.",  # blank steps, padded spaces
    "  \n\n \n\n",  # no step at all
    "The answer is \\boxed{10}.",  # one step
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def token_model(tok):
    return build_tiny_model(tok, task="token-classification", seed=1, **SMALL)


@pytest.fixture(scope="module")
def seq_model(tok):
    return build_tiny_model(tok, task="sequence-classification", seed=2, **SMALL)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def steps_of(completion: str) -> list[str]:
    return [s.strip() for s in completion.split("\n\n") if s.strip()]


def probs_at(model, input_ids: list[int], positions: list[int], label: int = 1) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    return torch.softmax(logits[positions].float(), dim=-1)[:, label].tolist()


def math_shepherd_reference(tok, model, prompt: str, completion: str, max_length: int | None = None):
    step_id = tok.convert_tokens_to_ids(STEP_TOKEN)
    seq = [tok.bos_token_id, *ids(tok, prompt)]
    positions = []
    for step in steps_of(completion):
        seq += [*ids(tok, step), step_id]
        positions.append(len(seq) - 1)
    if not positions:
        return []
    if max_length is not None and len(seq) > max_length:
        cut = len(seq) - max_length
        seq = seq[cut:]
        positions = [p - cut for p in positions if p >= cut]
    return probs_at(model, seq, positions) if positions else []


class ForwardCounter:
    """Counts forward passes of a model and records whether they ran with gradients."""

    def __init__(self, model):
        self.calls = 0
        self.grad_enabled: list[bool] = []
        self.logits_require_grad: list[bool] = []
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        self.logits_require_grad.append(output.logits.requires_grad)

    def remove(self):
        self._handle.remove()


# ---------------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    ("how", "expected"), [("min", 0.2), ("prod", 0.9 * 0.2 * 0.5), ("last", 0.5)], ids=["min", "prod", "last"]
)
def test_aggregate_step_rewards(how, expected):
    assert aggregate_step_rewards([0.9, 0.2, 0.5], how) == pytest.approx(expected)
    assert aggregate_step_rewards([0.7], how) == pytest.approx(0.7)
    assert aggregate_step_rewards([], how) is None
    assert aggregate_step_rewards((x for x in [0.3, 0.4]), how) is not None  # any iterable of floats


def test_aggregate_defaults_to_min_and_rejects_unknown():
    assert aggregate_step_rewards([0.9, 0.1, 0.5]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"reward_aggregation.*'mean'.*'min', 'prod', 'last'"):
        aggregate_step_rewards([0.5], "mean")
    with pytest.raises(ValueError, match="reward_aggregation"):
        aggregate_step_rewards([], "max")  # checked even when there is nothing to aggregate


def test_split_steps():
    assert split_steps(" a \n\nb\n\n\n\n  \n\nc\n") == ["a", "b", "c"]
    assert split_steps("") == []
    assert split_steps("\n\n  \n\n") == []
    assert split_steps("a\nb") == ["a\nb"]
    assert split_steps("a; b;", separator=";") == ["a", "b"]
    with pytest.raises(ValueError):
        split_steps("a", separator="")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.1, 0.2, 0.3], r"reward function 'my_fn' returned 3 values for 4 completions"),
        ([0.1, float("inf"), 0.2, 0.3], r"'my_fn' returned inf at index 1: rewards must be finite"),
        ([0.1, True, 0.2, 0.3], r"'my_fn' returned True \(bool\) at index 1"),
        ([0.1, 0.2, "0.3", 0.4], r"'my_fn' returned '0.3' \(str\) at index 2"),
        ([0.1, 0.2, 0.3, torch.tensor(0.4)], r"\(Tensor\) at index 3"),
        ({"a": 1}, r"'my_fn' returned a dict; expected a list of 4 values"),
        (None, r"'my_fn' returned a NoneType"),
        (torch.zeros(4), r"returned a Tensor"),
    ],
)
def test_check_rewards_rejects(values, message):
    with pytest.raises(ValueError, match=message):
        check_rewards(values, 4, "my_fn")


def test_check_rewards_accepts_reals_and_none():
    out = check_rewards([1, None, 0.5, -2.0], 4, "f")
    assert out == [1.0, None, 0.5, -2.0]
    assert all(type(v) is float for v in out if v is not None)
    assert check_rewards((0.5,), 1, "f") == [0.5]
    assert check_rewards([], 0, "f") == []
    assert check_rewards([None, None], 2, "f") == [None, None]
    assert check_rewards([0.5, float("nan")], 2, "f") == [0.5, None]  # NaN means None, as in GRPOTrainer


def test_combine_rewards_weighted_sum_ignoring_none():
    def a(prompts, completions, **kw):
        return [1.0, None, 0.5, None]

    def b(prompts, completions, **kw):
        return [0.5, 0.25, None, None]

    seen = {}

    def c(prompts, completions, answer, **kw):  # receives the dataset's columns
        seen["answer"] = answer
        return [0.0, 0.0, 0.0, None]

    combined = combine_rewards([a, b, c], weights=[2.0, 4.0, 1.0])
    assert isinstance(combined, CombinedReward) and isinstance(combined, RewardSource)
    assert combined.name == "a+b+c" and reward_source_name(combined) == "a+b+c"
    out = combined(["p"] * 4, ["c"] * 4, answer=["1", "2", "3", "4"])
    assert out == [pytest.approx(4.0), pytest.approx(1.0), pytest.approx(1.0), None]
    assert seen["answer"] == ["1", "2", "3", "4"]
    assert combine_rewards([a, b])(["p"] * 4, ["c"] * 4) == [1.5, 0.25, 0.5, None]  # default weights 1


def test_combine_rewards_errors():
    def short(prompts, completions, **kw):
        return [1.0]

    def nan(prompts, completions, **kw):
        return [float("nan")] * len(completions)

    with pytest.raises(ValueError, match=r"reward function 'short' returned 1 values for 2 completions"):
        combine_rewards([short])(["p", "q"], ["c", "d"])
    assert combine_rewards([nan])(["p"], ["c"]) == [None]  # NaN is "cannot score", not an error
    with pytest.raises(ValueError, match="2 reward weights for 1 reward sources"):
        combine_rewards([short], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite real"):
        combine_rewards([short], weights=[float("nan")])
    with pytest.raises(ValueError, match="finite real"):
        combine_rewards([short], weights=[True])
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards([])
    with pytest.raises(TypeError, match="not callable"):
        combine_rewards([0.5])


def test_pure_helpers_do_not_import_torch():
    code = (
        "import sys\n"
        "from trl_hsstar.rewards import aggregate_step_rewards, check_rewards, combine_rewards, as_reward_source\n"
        "f = lambda prompts, completions, **kw: [0.5] * len(completions)\n"
        "assert as_reward_source(f) is f\n"
        "print(combine_rewards([f])(['p'], ['c']), aggregate_step_rewards([0.2, 0.4]))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[0.5] 0.2", "[]"], out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------
# Process reward model: Math-Shepherd layout


def test_math_shepherd_matches_unbatched_reference(tok, token_model):
    expected = [math_shepherd_reference(tok, token_model, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert [len(e) for e in expected] == [3, 2, 4, 0, 1]
    flat = [x for e in expected for x in e]
    assert max(flat) - min(flat) > 1e-3  # the check below can tell positions apart

    prm = ProcessRewardModel(token_model, tok, batch_size=2)  # 3 batches of sorted, right-padded sequences
    got = prm.step_rewards(PROMPTS, COMPLETIONS)
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)

    for how, agg in [("min", min), ("prod", math.prod), ("last", lambda v: v[-1])]:
        scores = ProcessRewardModel(token_model, tok, aggregation=how, batch_size=3)(PROMPTS, COMPLETIONS)
        assert scores[3] is None
        assert [s for i, s in enumerate(scores) if i != 3] == pytest.approx(
            [agg(e) for i, e in enumerate(expected) if i != 3], abs=1e-5
        )


def test_math_shepherd_batch_size_and_order_do_not_matter(tok, token_model):
    one = ProcessRewardModel(token_model, tok, batch_size=1).step_rewards(PROMPTS, COMPLETIONS)
    big = ProcessRewardModel(token_model, tok, batch_size=16).step_rewards(PROMPTS[::-1], COMPLETIONS[::-1])
    for a, b in zip(one, big[::-1]):
        assert a == pytest.approx(b, abs=1e-5)


def test_math_shepherd_positive_label_and_custom_step_token(tok, token_model):
    prompt, completion = PROMPTS[0], COMPLETIONS[0]
    p0 = ProcessRewardModel(token_model, tok, positive_label=0).step_rewards([prompt], [completion])[0]
    p1 = ProcessRewardModel(token_model, tok, positive_label=1).step_rewards([prompt], [completion])[0]
    assert [a + b for a, b in zip(p0, p1)] == pytest.approx([1.0] * 3, abs=1e-6)

    # a single ordinary token as separator (like TRL PRMConfig's default "\n"), steps split on ";"
    prm = ProcessRewardModel(token_model, tok, step_token="\n", step_separator=";")
    newline = ids(tok, "\n")[0]
    seq = [tok.bos_token_id, *ids(tok, prompt), *ids(tok, "a=1"), newline, *ids(tok, "b=2"), newline]
    expected = probs_at(token_model, seq, [len(seq) - 5, len(seq) - 1])
    assert prm.step_rewards([prompt], ["a=1; b=2"])[0] == pytest.approx(expected, abs=1e-5)


def test_math_shepherd_chat_messages_read_like_strings(tok, token_model):
    prm = ProcessRewardModel(token_model, tok, batch_size=2)
    as_text = prm(PROMPTS, COMPLETIONS)
    # the toy chat template renders a user turn as its content and adds no generation prompt
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    answers = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    as_chat = prm(chats, answers)
    assert as_chat[3] is None and as_text[3] is None
    assert [x for x in as_chat if x is not None] == pytest.approx(
        [x for x in as_text if x is not None], abs=1e-6
    )


def test_math_shepherd_truncation_keeps_the_last_tokens(tok, token_model):
    prompt, completion = PROMPTS[2], COMPLETIONS[2]  # 4 steps
    full = math_shepherd_reference(tok, token_model, prompt, completion)
    # keep the tokens after the first step token: that step loses its reward, the 3 others keep theirs
    first_step_token = 1 + len(ids(tok, prompt)) + len(ids(tok, "3+4=7"))
    total = 1 + len(ids(tok, prompt)) + sum(len(ids(tok, s)) + 1 for s in steps_of(completion))
    max_length = total - first_step_token - 1
    expected = math_shepherd_reference(tok, token_model, prompt, completion, max_length=max_length)
    assert len(expected) == 3
    prm = ProcessRewardModel(token_model, tok, max_length=max_length, aggregation="last", batch_size=2)
    got = prm.step_rewards([prompt, PROMPTS[1]], [completion, COMPLETIONS[1]])
    assert got[0] == pytest.approx(expected, abs=1e-5)
    assert got[0] != pytest.approx(full[1:], abs=1e-5)  # the truncated context changes the rewards
    assert len(got[1]) == 2  # short enough: untouched
    assert prm([prompt], [completion]) == [pytest.approx(expected[-1], abs=1e-5)]
    # the sequence ends with the last step token, so in this layout the last step always survives
    assert [
        len(r) for r in ProcessRewardModel(token_model, tok, max_length=1).step_rewards(PROMPTS, COMPLETIONS)
    ] == [
        1,
        1,
        1,
        0,
        1,
    ]


def test_qwen_truncation_can_leave_no_step(tok, token_model):
    # the chat template closes the assistant turn with EOS: keeping 1 token keeps no step token
    prm = ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, max_length=1)
    assert prm(PROMPTS[:2], COMPLETIONS[:2]) == [None, None]
    assert prm.step_rewards(PROMPTS[:2], COMPLETIONS[:2]) == [[], []]
    two = ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, max_length=2)
    step_id = tok.convert_tokens_to_ids(STEP_TOKEN)
    assert two.step_rewards(PROMPTS[:1], COMPLETIONS[:1]) == [
        pytest.approx(probs_at(token_model, [step_id, tok.eos_token_id], [0]), abs=1e-5)
    ]


# ---------------------------------------------------------------------------------------------------
# Process reward model: Qwen2.5-Math-PRM layout


def qwen_reference(tok, model, prompt: str, completion: str, system: str) -> list[float]:
    step_id = tok.convert_tokens_to_ids(STEP_TOKEN)
    # the toy chat template concatenates the contents and closes the assistant turn with EOS
    seq = ids(tok, system) + ids(tok, prompt)
    positions = []
    for step in steps_of(completion):
        seq += [*ids(tok, step), step_id]
        positions.append(len(seq) - 1)
    seq.append(tok.eos_token_id)
    return probs_at(model, seq, positions)


@pytest.mark.parametrize(
    "system", [None, "", "Think.\n"], ids=["default-system", "no-system", "custom-system"]
)
def test_qwen_layout_matches_unbatched_reference(tok, token_model, system):
    prm = ProcessRewardModel(
        token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, system_prompt=system, batch_size=2
    )
    expected_system = QWEN_PRM_SYSTEM_PROMPT if system is None else system
    got = prm.step_rewards(PROMPTS, COMPLETIONS)
    for p, c, g in zip(PROMPTS, COMPLETIONS, got):
        expected = qwen_reference(tok, token_model, p, c, expected_system) if steps_of(c) else []
        assert g == pytest.approx(expected, abs=1e-5)
    scores = prm(PROMPTS, COMPLETIONS)
    assert scores[3] is None
    assert scores[0] == pytest.approx(min(got[0]))


def test_qwen_layout_differs_from_math_shepherd_and_handles_chat_prompts(tok, token_model):
    qwen = ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, system_prompt="")
    shepherd = ProcessRewardModel(token_model, tok)
    a = qwen.step_rewards(PROMPTS[:1], COMPLETIONS[:1])[0]
    assert a != pytest.approx(shepherd.step_rewards(PROMPTS[:1], COMPLETIONS[:1])[0], abs=1e-5)  # no BOS
    # a chat prompt with its own system message keeps it, and is not given the default one
    chat = [{"role": "system", "content": "Sys."}, {"role": "user", "content": PROMPTS[0]}]
    got = ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN).step_rewards(
        [chat], [[{"role": "assistant", "content": COMPLETIONS[0]}]]
    )[0]
    assert got == pytest.approx(
        qwen_reference(tok, token_model, PROMPTS[0], COMPLETIONS[0], "Sys."), abs=1e-5
    )


def test_qwen_layout_roles_and_stray_step_tokens(token_model):
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    step_id = tok.convert_tokens_to_ids(STEP_TOKEN)

    def reference(head: str, steps: list[str]) -> list[float]:
        seq = ids(tok, head + "[assistant]")
        positions = []
        for step in steps:
            seq += [*ids(tok, step), step_id]
            positions.append(len(seq) - 1)
        return probs_at(token_model, seq, positions)

    # system_prompt="" leaves the system turn out; a non-empty one comes first
    no_system = ProcessRewardModel(
        token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, system_prompt=""
    )
    got = no_system.step_rewards(["Q: 1+2\nA: "], ["1+2=3\n\nThe answer is \\boxed{3}."])[0]
    assert got == pytest.approx(
        reference("[user]Q: 1+2\nA: ", ["1+2=3", "The answer is \\boxed{3}."]), abs=1e-5
    )
    with_system = ProcessRewardModel(
        token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN, system_prompt="S"
    )
    got = with_system.step_rewards(["Q: 1+2\nA: "], ["1+2=3\n\nThe answer is \\boxed{3}."])[0]
    assert got == pytest.approx(
        reference("[system]S[user]Q: 1+2\nA: ", ["1+2=3", "The answer is \\boxed{3}."]), abs=1e-5
    )
    # a step token in the prompt is not a step; one inside a step's text is removed
    prompt = "Q: 1+2 <step>\nA: "
    got = no_system.step_rewards([prompt], ["1+<step>2=3\n\ndone"])[0]
    assert got == pytest.approx(reference(f"[user]{prompt}", ["1+2=3", "done"]), abs=1e-5)


def test_qwen_layout_accepts_tuple_outputs(tok, token_model):
    class TupleModel(torch.nn.Module):  # like Qwen2ForProcessRewardModel called with return_dict=False
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return (self.inner(input_ids=input_ids, attention_mask=attention_mask).logits,)

    wrapped = ProcessRewardModel(TupleModel(token_model), tok, layout="qwen-prm", step_token=STEP_TOKEN)
    plain = ProcessRewardModel(token_model, tok, layout="qwen-prm", step_token=STEP_TOKEN)
    assert wrapped(PROMPTS, COMPLETIONS) == plain(PROMPTS, COMPLETIONS)


def test_qwen_layout_default_step_token_is_extra_0(tok, token_model):
    with pytest.raises(
        ValueError, match=r"no single token for step separator '<extra_0>'.*pass `step_token=`"
    ):
        ProcessRewardModel(token_model, tok, layout="qwen-prm")


# ---------------------------------------------------------------------------------------------------
# Errors, empty inputs, model state


@pytest.mark.parametrize("layout", ["math-shepherd", "qwen-prm"])
@pytest.mark.parametrize("step_token", ["<nope>", "ab", "", "\u00e9"])
def test_step_token_must_be_one_known_token_checked_before_any_forward(tok, token_model, layout, step_token):
    counter = ForwardCounter(token_model)
    try:
        with pytest.raises(ValueError, match=r"no single token for step separator .*pass `step_token=`"):
            ProcessRewardModel(token_model, tok, layout=layout, step_token=step_token)
    finally:
        counter.remove()
    assert counter.calls == 0


def test_no_steps_and_empty_inputs_skip_the_model(tok, token_model, seq_model):
    counter = ForwardCounter(token_model)
    try:
        prm = ProcessRewardModel(token_model, tok)
        assert prm([], []) == [] and prm.step_rewards([], []) == []
        assert prm(["Q"], [""]) == [None]
        assert prm(["Q", "R"], ["\n\n  \n\n", [{"role": "assistant", "content": " "}]]) == [None, None]
    finally:
        counter.remove()
    assert counter.calls == 0
    orm = OutcomeRewardModel(seq_model, tok)
    assert orm([], []) == [] and orm([""], [""]) == [None]
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        prm(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="lists"):
        prm("a", "c")


def test_constructor_validation(tok, token_model, seq_model):
    with pytest.raises(ValueError, match="reward_aggregation"):
        ProcessRewardModel(token_model, tok, aggregation="mean")
    with pytest.raises(ValueError, match="layout"):
        ProcessRewardModel(token_model, tok, layout="prm800k")
    with pytest.raises(ValueError, match="positive_label=2 but the model has num_labels=2"):
        ProcessRewardModel(token_model, tok, positive_label=2)
    with pytest.raises(ValueError, match="batch_size"):
        ProcessRewardModel(token_model, tok, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        ProcessRewardModel(token_model, tok, max_length=0)
    with pytest.raises(ValueError, match="system_prompt"):
        ProcessRewardModel(token_model, tok, system_prompt="x")
    with pytest.raises(ValueError, match="positive_label"):
        OutcomeRewardModel(seq_model, tok, positive_label=5)


def test_model_mode_restored_and_no_gradients(tok, token_model, seq_model):
    for model, source, forwards in [
        (token_model, ProcessRewardModel(token_model, tok, batch_size=2), 2),  # 4 completions have steps
        (seq_model, OutcomeRewardModel(seq_model, tok, batch_size=2), 3),
    ]:
        model.train()
        model.model.layers[0].eval()  # a mixed state must come back exactly
        before = {name: m.training for name, m in model.named_modules()}
        counter = ForwardCounter(model)
        try:
            out = source(PROMPTS, COMPLETIONS)
        finally:
            counter.remove()
            modes_after = {name: m.training for name, m in model.named_modules()}
            model.eval()
        assert counter.calls == forwards  # batches of 2
        assert not any(counter.grad_enabled) and not any(counter.logits_require_grad)
        assert modes_after == before
        assert all(p.grad is None for p in model.parameters())
        assert all(v is None or type(v) is float for v in out)


def test_scores_do_not_depend_on_dropout_mode(tok):
    model = build_tiny_model(tok, task="token-classification", seed=3, **SMALL)
    model.config.attention_dropout = 0.5
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    prm = ProcessRewardModel(model, tok)
    reference = prm(PROMPTS, COMPLETIONS)
    model.train()
    assert prm(PROMPTS, COMPLETIONS) == reference  # eval mode during scoring: dropout off
    assert model.training


# ---------------------------------------------------------------------------------------------------
# Outcome reward model


def test_orm_matches_unbatched_reference(tok, seq_model):
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    with torch.no_grad():
        expected = [
            torch.softmax(seq_model(input_ids=torch.tensor([ids(tok, t)])).logits[0], -1)[1].item()
            for t in texts
        ]
    assert max(expected) - min(expected) > 1e-3
    got = OutcomeRewardModel(seq_model, tok, batch_size=2)(PROMPTS, COMPLETIONS)
    assert got == pytest.approx(expected, abs=1e-5)
    label0 = OutcomeRewardModel(seq_model, tok, positive_label=0)(PROMPTS, COMPLETIONS)
    assert [a + b for a, b in zip(got, label0)] == pytest.approx([1.0] * 5, abs=1e-6)

    # chat messages go through the chat template (the toy one appends EOS to the assistant turn)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    answers = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    with torch.no_grad():
        expected_chat = [
            torch.softmax(
                seq_model(input_ids=torch.tensor([[*ids(tok, t), tok.eos_token_id]])).logits[0], -1
            )[1].item()
            for t in texts
        ]
    assert OutcomeRewardModel(seq_model, tok, batch_size=3)(chats, answers) == pytest.approx(
        expected_chat, abs=1e-5
    )


def test_orm_single_label_uses_sigmoid_and_truncation(tok):
    model = build_tiny_model(tok, task="sequence-classification", seed=4, num_labels=1, **SMALL)
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids(tok, t)])).logits[0, 0].item() for t in texts]
        last20 = [model(input_ids=torch.tensor([ids(tok, t)[-20:]])).logits[0, 0].item() for t in texts]
    got = OutcomeRewardModel(model, tok, batch_size=4)(PROMPTS, COMPLETIONS)
    assert got == pytest.approx([1 / (1 + math.exp(-x)) for x in logits], abs=1e-5)
    got = OutcomeRewardModel(model, tok, batch_size=4, max_length=20)(PROMPTS, COMPLETIONS)
    assert got == pytest.approx([1 / (1 + math.exp(-x)) for x in last20], abs=1e-5)


def test_orm_without_pad_token_runs_one_at_a_time(tok):
    model = build_tiny_model(tok, task="sequence-classification", seed=5, **SMALL)
    reference = OutcomeRewardModel(model, tok, batch_size=4)(PROMPTS, COMPLETIONS)
    model.config.pad_token_id = None  # the head could not find the last token in a padded batch
    counter = ForwardCounter(model)
    try:
        assert OutcomeRewardModel(model, tok, batch_size=4)(PROMPTS, COMPLETIONS) == pytest.approx(
            reference, abs=1e-5
        )
    finally:
        counter.remove()
    assert counter.calls == 5


# ---------------------------------------------------------------------------------------------------
# as_reward_source


def test_as_reward_source(tok, token_model, seq_model):
    def my_fn(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    assert as_reward_source(my_fn) is my_fn and reward_source_name(my_fn) == "my_fn"
    part = functools.partial(my_fn)
    assert as_reward_source(part) is part and reward_source_name(part) == "my_fn"

    prm = as_reward_source(token_model, tokenizer=tok, aggregation="last", batch_size=3, max_length=64)
    assert isinstance(prm, ProcessRewardModel) and isinstance(prm, RewardSource)
    assert (prm.layout, prm.aggregation, prm.batch_size, prm.max_length) == ("math-shepherd", "last", 3, 64)
    assert prm.step_token == STEP_TOKEN and reward_source_name(prm) == prm.name
    assert as_reward_source(prm) is prm
    qwen = as_reward_source(token_model, tokenizer=tok, layout="qwen-prm", step_token=STEP_TOKEN)
    assert qwen.layout == "qwen-prm"

    orm = as_reward_source(seq_model, tokenizer=tok, batch_size=5)
    assert isinstance(orm, OutcomeRewardModel) and orm.batch_size == 5
    assert as_reward_source(orm) is orm


def test_as_reward_source_rejects(tok, token_model):
    with pytest.raises(TypeError, match="needs its tokenizer"):
        as_reward_source(token_model)
    causal = build_tiny_model(tok, task="causal-lm", **SMALL)
    with pytest.raises(TypeError, match="cannot use a LlamaForCausalLM as a reward source"):
        as_reward_source(causal, tokenizer=tok)
    with pytest.raises(TypeError, match=r"cannot use 42 \(int\) as a reward source"):
        as_reward_source(42)
    with pytest.raises(TypeError, match="cannot use 'model-name'"):
        as_reward_source("model-name")


# ---------------------------------------------------------------------------------------------------
# Docs


def test_docs_examples_run_as_written():
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 3, "docs/rewards.md lost its examples"
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, str(DOCS), "exec"), namespace)
    expected = [
        line.split("# prints ", 1)[1].strip()
        for code in blocks
        for line in code.splitlines()
        if "# prints " in line
    ]
    assert out.getvalue().strip().splitlines() == expected


def test_answer_reward_reads_text_and_chat_completions():
    from trl_hsstar import answer_reward

    chat = [{"role": "assistant", "content": [{"type": "text", "text": "so \\boxed{12}"}]}]
    assert answer_reward(["7 + 5 = \\boxed{12}", "\\boxed{13}", chat], ["12", "12", 12]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="NaN at index 1 on its check before any sampling"):
        check_rewards([0.5, float("nan")], 2, "prm", nan_is_error=True)
    assert check_rewards([0.5, float("nan")], 2, "prm") == [
        0.5,
        None,
    ]  # the sampling-time policy is unchanged
