"""A character-level tokenizer for the toy arithmetic world, built locally (no download).

Every printable ASCII character and ``"\\n"`` is one token, so rationales such as
``"12+7=19\\n\\n19+35=54\\n\\nThe answer is \\\\boxed{54}."`` encode and decode back exactly; any other
character becomes ``<unk>``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
STEP_TOKEN = "<step>"
"""Extra special token; the toy PRM uses it as the step separator."""

SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, STEP_TOKEN]  # ids 0..4
CHARACTERS = ["\n"] + [chr(c) for c in range(ord(" "), ord("~") + 1)]

# Concatenates message contents; an assistant turn is closed by EOS, and the generation prompt adds
# nothing (the user content already ends with "A: "). The {% generation %} markers let
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's assistant_only_loss) find the
# assistant tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ message['content'] }}{{ eos_token }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    The vocabulary is ``SPECIAL_TOKENS`` (ids 0..4) followed by ``"\\n"`` and the printable ASCII
    characters ``" "`` .. ``"~"`` (101 tokens in all). It is a BPE model without merges and without a
    pre-tokenizer, so every character is its own token, plus a ``Fuse`` decoder so that decoding
    concatenates the characters without inserting spaces.

    ``tokenizer(text)`` adds no BOS/EOS: prompts and completions are then plain concatenations of
    characters, which keeps prompt/completion boundaries exact for the trainers (they add EOS themselves
    where needed, and the chat template closes assistant turns with EOS). Padding side is the default
    (right); set ``tokenizer.padding_side = "left"`` for batched generation.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)  # so "<s>" etc. in text map to their single ids
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[STEP_TOKEN],  # transformers 5 name of additional_special_tokens
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
