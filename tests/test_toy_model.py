"""Tests for the toy char tokenizer and the tiny Llama models (CPU, no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from trl_hsstar.toy import STEP_TOKEN, build_char_tokenizer, build_tiny_model, tiny_llama_config

TEXT = "Q: 12+7+35\nA: 12+7=19\n\n19+35=54\n\nThe answer is \\boxed{54}.  {x} \\ ~"
PROMPTS = ["Q: 1+2\nA: ", "Q: 12+7+35\nA: "]
# small model keeps the tests fast; the defaults are exercised by test_default_config
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _left_padded_batch(tok):
    tok.padding_side = "left"
    try:
        return tok(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "right"


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_vocab_layout(tok):
    assert len(tok) == 5 + 1 + 95
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 5, 6]) == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<step>",
        "\n",
        " ",
    ]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert STEP_TOKEN == "<step>" and STEP_TOKEN in tok.all_special_tokens
    assert tok.model_max_length == 512
    assert tok.padding_side == "right"


def test_round_trip_is_exact(tok):
    ids = tok(TEXT)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character, no BOS/EOS added
    assert tok.decode(ids) == TEXT
    assert tok("ab")["input_ids"] == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    assert tok.decode(tok("\n\n")["input_ids"]) == "\n\n"
    # special tokens in text are single ids
    assert tok("1+1=2<step>")["input_ids"][-1] == tok.convert_tokens_to_ids(STEP_TOKEN)


def test_unknown_chars_map_to_unk(tok):
    ids = tok("a\u00e9\tb")["input_ids"]
    assert ids == [
        tok.convert_tokens_to_ids("a"),
        tok.unk_token_id,
        tok.unk_token_id,
        tok.convert_tokens_to_ids("b"),
    ]


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [TEXT, "", "a\u00e9<s>b</s><step>\n\n  ", "".join(chr(c) for c in range(32, 127))]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (0, 2, len(tok))
    assert STEP_TOKEN in loaded.all_special_tokens


def test_chat_template(tok):
    user = [{"role": "user", "content": "Q: 1+2\nA: "}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == "Q: 1+2\nA: "
    answer = "1+2=3\n\nThe answer is \\boxed{3}."
    full = [*user, {"role": "assistant", "content": answer}]
    assert tok.apply_chat_template(full, tokenize=False) == "Q: 1+2\nA: " + answer + "</s>"
    system = [{"role": "system", "content": "S|"}, *user]
    assert tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == "S|Q: 1+2\nA: "
    # the {% generation %} markers give the assistant mask TRL's assistant_only_loss needs
    out = tok.apply_chat_template(full, return_dict=True, return_assistant_tokens_mask=True)
    n_prompt = len("Q: 1+2\nA: ")
    assert out["assistant_masks"] == [0] * n_prompt + [1] * (len(answer) + 1)


# ---------------------------------------------------------------------------------------------------
# Models


def test_default_config(tok):
    config = tiny_llama_config(tok)
    assert isinstance(config, LlamaConfig)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_dim) == (
        101,
        128,
        4,
        32,
    )
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.tie_word_embeddings
    assert not tiny_llama_config(tok, task="token-classification").tie_word_embeddings


@pytest.mark.parametrize(
    ("task", "shape"),
    [
        ("causal-lm", (2, 14, 101)),
        ("token-classification", (2, 14, 2)),
        ("sequence-classification", (2, 2)),
    ],
)
def test_output_shapes_on_left_padded_batch(tok, task, shape):
    batch = _left_padded_batch(tok)
    assert batch["input_ids"].shape == (2, 14) and batch["input_ids"][0, 0] == tok.pad_token_id
    model = build_tiny_model(tok, task=task, **SMALL)
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**tok(PROMPTS[0], return_tensors="pt")).logits[0]
    assert logits.shape == shape
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.config.pad_token_id == tok.pad_token_id
    # the left-padded row gives the same outputs as the prompt alone (padding is masked out; the
    # sequence classifier reads the last non-pad token)
    n = len(PROMPTS[0])
    padded_row = logits[0] if task == "sequence-classification" else logits[0, -n:]
    torch.testing.assert_close(padded_row, alone, atol=1e-4, rtol=1e-4)


def test_unknown_task(tok):
    with pytest.raises(ValueError, match="causal-lm"):
        build_tiny_model(tok, task="seq2seq")


def test_seed_determinism_and_global_rng_untouched(tok):
    torch.manual_seed(123)
    control = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tok, seed=0, **SMALL)
    b = build_tiny_model(tok, seed=0, **SMALL)
    c = build_tiny_model(tok, seed=1, **SMALL)
    assert torch.equal(torch.rand(3), control)  # building models did not consume the caller's RNG
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied


def test_generate(tok):
    model = build_tiny_model(tok, **SMALL)
    batch = tok(PROMPTS[1], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 5
    assert torch.equal(out[0, : batch["input_ids"].shape[1]], batch["input_ids"][0])
    assert isinstance(tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True), str)


def test_save_and_reload_model(tok, tmp_path):
    model = build_tiny_model(tok, **SMALL)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.dtype == torch.float32
    batch = _left_padded_batch(tok)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
