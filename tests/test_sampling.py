"""The sampler interface and the transformers backend, on tiny CPU models (no downloads)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from trl_hsstar.sampling import (
    Completion,
    Sampler,
    SamplingParams,
    TransformersSampler,
    expand_requests,
    validate_request,
)
from trl_hsstar.toy import build_char_tokenizer, build_tiny_model

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=64)
# different lengths, different endings: their greedy continuations differ
PROMPTS = ["Q: 1+2\nA: ", "Q: 12+2+3\nA: ", "x", "Q: 4+5\nA: "]
GREEDY = SamplingParams(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def scrambled_model(tok, seed=0):
    """A tiny model with large random weights: its greedy continuations depend on the whole prompt
    (a freshly initialised one mostly repeats the prompt's last character)."""
    model = build_tiny_model(tok, seed=seed, **SMALL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=g)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return scrambled_model(tok)


class Spy:
    """Wraps ``model.generate`` on the instance and records every call's inputs."""

    def __init__(self, model):
        self.model, self.original, self.calls = model, model.generate, []
        model.generate = self

    def __call__(self, **kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")})
        return self.original(**kwargs)

    @property
    def rows(self) -> int:
        return sum(c["input_ids"].shape[0] for c in self.calls)

    @property
    def padding(self) -> int:
        return sum(int((c["attention_mask"] == 0).sum()) for c in self.calls)

    def remove(self):
        del self.model.generate


@pytest.fixture
def spy(model):
    s = Spy(model)
    yield s
    s.remove()


def generated_ids(model, tok, prompt, max_new_tokens):
    """The greedy continuation of ``prompt`` alone (no padding), up to its first EOS."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def unbatched_greedy(model, tok, prompt, max_new_tokens):
    return tok.decode(generated_ids(model, tok, prompt, max_new_tokens), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------
# The interface


def test_interface_module_does_not_import_torch():
    code = "import sys, trl_hsstar.sampling; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_expand_requests():
    assert expand_requests([2, 0, 1]) == [0, 0, 2]
    assert expand_requests([]) == []


@pytest.mark.parametrize(
    ("prompts", "num_samples", "params", "field"),
    [
        (["a", "b"], [1], SamplingParams(), "num_samples"),
        ("ab", [1, 1], SamplingParams(), "prompts"),
        (["a", 3], [1, 1], SamplingParams(), "prompts[1]"),
        ([[{"role": "user", "content": "a"}]], [1], SamplingParams(), "prompts[0]"),
        (["a", "b"], [1, -1], SamplingParams(), "num_samples[1]"),
        (["a"], [1.0], SamplingParams(), "num_samples[0]"),
        (["a"], [True], SamplingParams(), "num_samples[0]"),
        (["a"], [1], {"temperature": 0.7}, "params"),
    ],
)
def test_validate_request_names_the_field(prompts, num_samples, params, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        validate_request(prompts, num_samples, params)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, "max_new_tokens"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_sampling_params_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SamplingParams(**kwargs)
    assert SamplingParams(temperature=0, top_p=1.0, max_new_tokens=1, seed=0).greedy


def test_generate_validates_before_generating(model, tok, spy):
    sampler = TransformersSampler(model, tok, progress=False)
    with pytest.raises(ValueError, match="`num_samples`"):
        sampler.generate(PROMPTS, [1, 1], GREEDY)
    assert spy.calls == []
    with pytest.raises(ValueError, match="`batch_size`"):
        TransformersSampler(model, tok, batch_size=0)


def test_a_backend_is_one_small_subclass():
    class Echo(Sampler):
        name = "echo"

        def generate(self, prompts, num_samples, params):
            validate_request(prompts, num_samples, params)
            results = [
                [Completion(p, len(p), "stop") for _ in range(n)] for p, n in zip(prompts, num_samples)
            ]
            self._record(results, 0.5)
            return results

    with Echo() as sampler:
        assert sampler.generate(["ab", "c"], [2, 1], SamplingParams())[0][1].text == "ab"
        sampler.generate(["d"], [0], SamplingParams())
        stats = sampler.stats
    assert (stats.num_generated, stats.num_completion_tokens, stats.generation_seconds) == (3, 5, 1.0)
    assert stats.tokens_per_second == 5.0 and stats.samples_per_second == 3.0
    assert Sampler.num_generated == 0  # counters are per instance


# ---------------------------------------------------------------------------------------------------
# TransformersSampler


def test_exact_counts_in_input_order_matching_unbatched_greedy(model, tok, spy):
    sampler = TransformersSampler(model, tok, batch_size=4, progress=False)
    results = sampler.generate(PROMPTS, [3, 0, 5, 1], GREEDY)

    assert [len(r) for r in results] == [3, 0, 5, 1]
    assert spy.rows == 9 and len(spy.calls) == 3  # 9 generations, in batches of at most 4
    assert all(c["input_ids"].shape[0] <= 4 for c in spy.calls)
    expected = [unbatched_greedy(model, tok, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert len(set(expected)) == len(PROMPTS)  # the prompts are distinguishable
    for prompt_results, text in zip(results, expected):
        assert [c.text for c in prompt_results] == [text] * len(prompt_results)
    # stats are cumulative
    assert sampler.num_generated == 9
    assert sampler.num_completion_tokens == sum(c.num_tokens for r in results for c in r)
    assert sampler.generation_seconds > 0
    sampler.generate(PROMPTS[:1], [2], GREEDY)
    assert sampler.num_generated == 11


def test_zero_samples_spend_nothing(model, tok, spy):
    sampler = TransformersSampler(model, tok, progress=False)
    assert sampler.generate(PROMPTS[:2], [0, 0], GREEDY) == [[], []]
    assert sampler.generate([], [], GREEDY) == []
    assert spy.calls == [] and sampler.num_generated == 0


def test_batches_are_grouped_by_prompt_length(model, tok, spy):
    short, long = "1+1", "Q: 1+2+3+4+5+6+7+8\nA: "
    prompts = [short, long, short + " ", long + " "] * 2  # 8 prompts alternating short / long
    sampler = TransformersSampler(model, tok, batch_size=4, progress=False)
    results = sampler.generate(prompts, [2] * 8, SamplingParams(temperature=0, max_new_tokens=2))
    assert [len(r) for r in results] == [2] * 8

    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    flat = expand_requests([2] * 8)
    unsorted_padding = sum(
        len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch)
        for batch in (flat[b : b + 4] for b in range(0, len(flat), 4))
    )
    assert unsorted_padding > 50
    assert spy.padding <= 4  # each batch holds prompts of (nearly) the same length
    assert spy.rows == 16


def test_left_padding_and_bos_rule(model, tok, spy):
    """A prompt already starting with BOS is not given a second one; padding goes on the left."""
    from tokenizers import processors

    bos_tok = build_char_tokenizer()
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.bos_token_id)]
    )
    assert bos_tok("ab")["input_ids"][0] == bos_tok.bos_token_id  # this tokenizer adds BOS
    sampler = TransformersSampler(model, bos_tok, batch_size=8, progress=False)
    sampler.generate(["ab", "<s>ab", "abcd"], [1, 1, 1], SamplingParams(temperature=0, max_new_tokens=1))
    (call,) = spy.calls
    rows = [
        [t for t, m in zip(ids, mask) if m]
        for ids, mask in zip(call["input_ids"].tolist(), call["attention_mask"].tolist())
    ]
    a, b = bos_tok.convert_tokens_to_ids(["a", "b"])
    assert sorted(rows, key=len) == [
        [1, a, b],
        [1, a, b],
        [1, a, b, *bos_tok.convert_tokens_to_ids(["c", "d"])],
    ]
    assert call["attention_mask"][:, -1].tolist() == [1, 1, 1]  # left padding
    assert bos_tok.padding_side == "right"  # the tokenizer is left as it was


def test_eos_stops_and_is_counted_but_not_decoded(tok):
    """Rows forced to emit EOS as their 3rd token stop there; the others run to max_new_tokens."""
    model = scrambled_model(tok, seed=1)
    model.generation_config.eos_token_id = None  # the tokenizer's EOS must count on its own
    eos, special = tok.eos_token_id, list(range(5))
    state = {"step": 0}

    def force(module, args, logits):
        logits = logits.clone()
        logits[..., special] = -1e4  # only plain characters...
        state["step"] += 1
        if state["step"] == 3:
            logits[0::2, -1, eos] = 1e4  # ...except EOS as the 3rd token of every other row
        return logits

    handle = model.lm_head.register_forward_hook(force)
    try:
        sampler = TransformersSampler(model, tok, batch_size=8, progress=False)
        (results,) = sampler.generate(["Q: 7+8\nA: "], [6], SamplingParams(temperature=0, max_new_tokens=6))
    finally:
        handle.remove()
    stopped, ran_out = results[0::2], results[1::2]
    full = ran_out[0].text
    assert len(full) == 6 and "</s>" not in full
    assert all(c == Completion(full[:2], 3, "stop") for c in stopped)
    assert all(c == Completion(full, 6, "length") for c in ran_out)
    assert sampler.num_completion_tokens == 3 * 3 + 3 * 6  # padding after EOS is not counted


def test_generation_config_eos_ids_are_used(model, tok):
    sampler = TransformersSampler(model, tok, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    (full,) = sampler.generate(PROMPTS[1:2], [1], params)[0]
    assert full.finish_reason == "length" and full.num_tokens == 10
    k = next(k for k in range(1, 10) if full.text[k] not in full.text[:k])  # first new character
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(full.text[k])]
    try:
        (cut,) = sampler.generate(PROMPTS[1:2], [1], params)[0]
    finally:
        model.generation_config.eos_token_id = original
    assert cut == Completion(full.text[:k], k + 1, "stop")


def test_stop_strings(model, tok):
    prompt = PROMPTS[0]
    (full,) = TransformersSampler(model, tok, progress=False).generate([prompt], [1], GREEDY)[0]
    stop = full.text[4:6]
    at = full.text.find(stop)
    sampler = TransformersSampler(model, tok, progress=False, stop_strings=[stop, "not generated"])
    (cut,) = sampler.generate([prompt], [1], GREEDY)[0]
    assert cut.text == full.text[:at] and cut.finish_reason == "stop"
    # counted up to the token completing the stop string (special tokens count but do not show in text)
    ids = generated_ids(model, tok, prompt, GREEDY.max_new_tokens)
    assert cut.num_tokens == next(
        k for k in range(len(ids) + 1) if stop in tok.decode(ids[:k], skip_special_tokens=True)
    )
    assert cut.num_tokens >= at + len(stop)


def test_seeded_sampling_is_reproducible_and_leaves_the_caller_rng_alone(model, tok):
    sampler = TransformersSampler(model, tok, batch_size=4, progress=False)

    def texts(seed):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=seed)
        return [[c.text for c in r] for r in sampler.generate(PROMPTS[:2], [3, 3], params)]

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, again, other = texts(1), texts(1), texts(2)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == again
    assert first != other
    assert len({t for r in first for t in r}) > 1  # it does sample


def test_peft_model_and_training_mode_restored(tok):
    peft = pytest.importorskip("peft")
    base = scrambled_model(tok, seed=2)
    expected = [unbatched_greedy(base, tok, p, 6) for p in PROMPTS]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    frozen = model.base_model.model.model.layers[0].mlp
    frozen.eval()  # a mixed state must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    hook = model.base_model.model.lm_head.register_forward_hook(lambda m, a, o: seen.append(m.training))

    sampler = TransformersSampler(model, tok, batch_size=3, progress=False)
    results = sampler.generate(PROMPTS, [1, 2, 1, 1], SamplingParams(temperature=0, max_new_tokens=6))
    hook.remove()

    # LoRA's B starts at zero, so the adapted model generates exactly what the base model does
    assert [[c.text for c in r] for r in results] == [[e] * n for e, n in zip(expected, [1, 2, 1, 1])]
    assert seen and not any(seen)  # generation ran in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not frozen.training


def test_accelerator_unwraps_for_generation(model, tok, monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    import trl.models.utils as trl_utils

    unwrapped = []
    original = trl_utils.unwrap_model_for_generation

    def spying_unwrap(m, accelerator, **kwargs):
        unwrapped.append(m)
        return original(m, accelerator, **kwargs)

    monkeypatch.setattr(trl_utils, "unwrap_model_for_generation", spying_unwrap)
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        prepared = accelerator.prepare(model)
        sampler = TransformersSampler(prepared, tok, batch_size=4, accelerator=accelerator, progress=True)
        results = sampler.generate(PROMPTS, [1, 1, 0, 2], GREEDY)
        plain = TransformersSampler(model, tok, batch_size=4, progress=False).generate(
            PROMPTS, [1, 1, 0, 2], GREEDY
        )
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert unwrapped == [prepared]
    assert results == plain and [len(r) for r in results] == [1, 1, 0, 2]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_grpo_sampling_knobs_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SamplingParams(**kwargs)


def test_top_k_and_generation_kwargs_reach_generate(model, tok):
    """top_k=1 at temperature 1 is greedy decoding; generation_kwargs override the other fields."""
    sampler = TransformersSampler(model, tok, progress=False)
    top1 = SamplingParams(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=10, seed=0)
    assert [r[0].text for r in sampler.generate(PROMPTS, [1] * 4, top1)] == [
        unbatched_greedy(model, tok, p, 10) for p in PROMPTS
    ]
    short = SamplingParams(temperature=0, max_new_tokens=10, generation_kwargs={"max_new_tokens": 2})
    assert all(r[0].num_tokens <= 2 for r in sampler.generate(PROMPTS, [1] * 4, short))


def test_vllm_requests_carry_the_sampling_knobs(tok):
    from trl_hsstar.sampling.vllm_sampler import vllm_request

    params = SamplingParams(
        top_k=5, min_p=0.05, repetition_penalty=1.1, generation_kwargs={"presence_penalty": 0.5}
    )
    _, _, _, fields = vllm_request(tok, ["a"], [1], params, stop=None)
    assert (fields["top_k"], fields["min_p"], fields["repetition_penalty"]) == (5, 0.05, 1.1)
    assert fields["extra"] == {"presence_penalty": 0.5}
    _, _, _, off = vllm_request(tok, ["a"], [1], SamplingParams(), stop=None)
    assert (off["top_k"], off["min_p"], off["extra"]) == (-1, 0.0, {})  # vLLM's "off"


class _ShardedAccelerator:
    """What the sampler reads of an ``accelerate.Accelerator`` whose weights are sharded over two processes (FSDP
    or ZeRO-3: accelerate shards accelerator processes only, so this cannot run on CPU processes). ``gather``
    stands for the collective: the other process reports ``other_calls`` generate calls."""

    num_processes = 2
    is_local_main_process = True
    device = torch.device("cpu")

    def __init__(self, kind: str, other_calls: int):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType[kind]
        self.other_calls = other_calls
        self.gathered = []

    def gather(self, tensor):
        self.gathered.append(int(tensor.item()))
        return torch.cat([tensor, torch.tensor([self.other_calls])])


@pytest.mark.parametrize(
    ("kind", "other_calls", "extra"), [("FSDP", 5, 3), ("DEEPSPEED", 5, 3), ("FSDP", 1, 0)]
)
def test_sharded_weights_call_generate_as_often_as_the_busiest_process(
    model, tok, monkeypatch, kind, other_calls, extra
):
    """Under FSDP or ZeRO-3 every forward is collective: a process with fewer batches than another (its last
    chunk is short, or empty) makes one-token calls after its own, so none waits for a call another never makes;
    its own samples are what it would draw alone."""
    import contextlib

    import trl.models.utils as trl_utils

    monkeypatch.setattr(trl_utils, "unwrap_model_for_generation", lambda m, a, **k: contextlib.nullcontext(m))
    calls = []
    original = model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs["max_new_tokens"])
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    accelerator = _ShardedAccelerator(kind, other_calls)
    sampler = TransformersSampler(model, tok, batch_size=2, accelerator=accelerator, progress=False)
    results = sampler.generate(PROMPTS, [1, 1, 0, 2], GREEDY)  # 4 samples in batches of 2: 2 calls
    assert accelerator.gathered == [2]
    assert calls == [GREEDY.max_new_tokens] * 2 + [1] * extra
    monkeypatch.setattr(model, "generate", original)
    alone = TransformersSampler(model, tok, batch_size=2, progress=False).generate(
        PROMPTS, [1, 1, 0, 2], GREEDY
    )
    assert results == alone


def test_data_parallel_processes_do_not_synchronize_generate_calls(model, tok, monkeypatch):
    import contextlib

    import trl.models.utils as trl_utils

    monkeypatch.setattr(trl_utils, "unwrap_model_for_generation", lambda m, a, **k: contextlib.nullcontext(m))
    accelerator = _ShardedAccelerator("MULTI_CPU", 5)
    TransformersSampler(model, tok, batch_size=2, accelerator=accelerator, progress=False).generate(
        PROMPTS, [1, 1, 0, 2], GREEDY
    )
    assert accelerator.gathered == []  # whole weights on each process: nothing to wait for
