"""The tokenizer built from GGUF metadata, checked against transformers on the same file."""

from __future__ import annotations

import pytest

from kvserve.model.loader import Checkpoint
from kvserve.model.tokenizer import IncrementalDecoder, Tokenizer

TRICKY_TEXTS = [
    "Héllo wörld, ça va? naïve café, Ångström, São Paulo",
    "日本語のテキストと中文混合，还有한국어",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\n    else:\n        pass\n",
    "a    b\n\n\n   c\r\n  \t end   ",
    "digits 1234567 and 3.14159, v2.0.1, x1y22z333",
    " leading space",
    "  two leading spaces",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
    "<|im_start|",
    "I'm sure they'll say we've done it, it's 'quoted'",
    "nbsp\u00a0zero\u200bwidth",
    "<jupyter_code>print(1)<empty_output>",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3? 🙂"},
]


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    return checkpoint.tokenizer


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_ids_match_transformers(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_decode_round_trips(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_are_skipped_in_decode(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nhi"


def test_numerals_split_from_their_space(tokenizer: Tokenizer) -> None:
    """SmolLM2's pre-tokenizer isolates every \\p{N} character (llama.cpp's 'smollm', the
    model's tokenizer.json Digits step); transformers' GGUF converter lacks that step and
    merges " ²" into "Ġ" "Â" "²" pieces instead."""
    ids = tokenizer.encode(" ² ½")
    assert [tokenizer.id_to_token(i) for i in ids] == ["Ġ", "Â²", "Ġ", "Â½"]


def test_special_ids_and_sizes(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1 and tokenizer.id_to_token(1) == "<|im_start|>"
    assert tokenizer.eos_token_ids == (2,) and tokenizer.id_to_token(2) == "<|im_end|>"
    assert not tokenizer.add_bos_token
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id


def test_end_of_turn_token_in_template_is_a_stop_token(tokenizer: Tokenizer) -> None:
    other = Tokenizer(
        tokenizer.backend,
        bos_token_id=1,
        eos_token_ids=[0],  # <|endoftext|>
        add_bos_token=True,
        chat_template=tokenizer.chat_template,
    )
    assert other.eos_token_ids == (0, 2)
    assert other.encode("hi") == [1, *tokenizer.encode("hi")]
    assert other.encode("hi", add_special_tokens=False) == tokenizer.encode("hi")


def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for messages in (CONVERSATION, CONVERSATION[1:]):  # without a system turn: default one
        for add_prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt)
            theirs = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_prompt
            )
            assert ours == theirs
    expected_ids = hf_tokenizer.encode(
        hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert tokenizer.encode_chat(CONVERSATION) == expected_ids
    assert expected_ids[-4:] == tokenizer.encode("<|im_start|>assistant\n")


def test_content_parts_are_flattened(tokenizer: Tokenizer) -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]
    as_parts = [{"role": "user", "content": parts}]
    as_string = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tokenizer.apply_chat_template(as_parts) == tokenizer.apply_chat_template(as_string)


def test_template_errors_are_value_errors(tokenizer: Tokenizer) -> None:
    def with_template(template: str | None) -> Tokenizer:
        return Tokenizer(
            tokenizer.backend,
            bos_token_id=1,
            eos_token_ids=[2],
            add_bos_token=False,
            chat_template=template,
        )

    strict = with_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.apply_chat_template(CONVERSATION)
    with pytest.raises(ValueError, match="no chat template"):
        with_template(None).apply_chat_template(CONVERSATION)


def test_incremental_decoder_never_splits_a_character(tokenizer: Tokenizer) -> None:
    text = "Hi 👨‍👩‍👧‍👦 and 🇫🇷! 日本語のテキスト, 한국어 ✓ naïve"
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.step(token_id) for token_id in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # some multi-byte characters did span several tokens


def test_incremental_decoder_skips_special_tokens(tokenizer: Tokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer.encode("<|im_start|>assistant\nOK<|im_end|>")
    assert "".join(decoder.step(i) for i in ids) + decoder.flush() == "assistant\nOK"


def test_incremental_decoder_flushes_an_incomplete_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🙂")
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.step(i) for i in ids[:-1]] == ["a"] + [""] * (len(ids) - 2)
    assert decoder.flush().startswith("\ufffd")
    assert decoder.flush() == ""
