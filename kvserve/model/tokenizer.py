"""Tokenizer and chat template, built from the model file with `tokenizers` and `jinja2`.

A GGUF file carries its vocabulary, merges and pre-tokenizer name as metadata; a Hugging Face
directory carries `tokenizer.json`. Both end up as one `tokenizers.Tokenizer` wrapped here, with
the BOS rule, the stop tokens and the chat template beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from kvserve.model.errors import ModelLoadError

# Tokens that close a chat turn; one that the chat template writes is a stop token too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_TOKEN_NORMAL, _GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED = 1, 3, 4


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's "smollm"/"starcoder": each digit alone (\p{N}), then the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# GGUF `tokenizer.ggml.pre` -> (pre-tokenizer, ignore_merges), as llama.cpp splits text.
_GGUF_PRE_TOKENIZERS = {
    "gpt2": (_gpt2_split, False),
    "smollm": (_digits_then_gpt2_split, False),
    "starcoder": (_digits_then_gpt2_split, False),
    "refact": (_digits_then_gpt2_split, False),
    "llama-bpe": (lambda: _regex_split(_LLAMA3_SPLIT), True),
    "llama3": (lambda: _regex_split(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _regex_split(_QWEN2_SPLIT), False),
}


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and stop tokens."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos_token: bool,
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._bos_token_id = bos_token_id
        self._eos_token_ids = _with_end_of_turn(backend, eos_token_ids, chat_template)
        self._template = _compile_template(chat_template) if chat_template else None
        # As the chat template and tokenizer_config.json spell them.
        self._bos_token = None if bos_token_id is None else backend.id_to_token(bos_token_id)
        eos_ids = self._eos_token_ids
        self._eos_token = backend.id_to_token(eos_ids[0]) if eos_ids else None

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` metadata: byte-level BPE ('gpt2'), or
        SentencePiece BPE ('llama': scores, byte fallback, as Gemma's)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind == "llama":
            return cls._from_gguf_sentencepiece(metadata)
        if kind != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer model '{kind}' is not supported (byte-level BPE 'gpt2' or "
                "SentencePiece BPE 'llama'); use the model's Hugging Face directory instead"
            )
        pre = metadata.get("tokenizer.ggml.pre", "default")  # llama.cpp's own "default" split
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise ModelLoadError(
                f"GGUF pre-tokenizer '{pre}' is not supported (supported: "
                f"{', '.join(sorted(_GGUF_PRE_TOKENIZERS))}); use the Hugging Face directory"
            )
        make_pre_tokenizer, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
        vocab = {token: token_id for token_id, token in enumerate(tokens)}
        backend = Backend(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        backend.pre_tokenizer = make_pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        _add_gguf_special_tokens(backend, tokens, metadata.get("tokenizer.ggml.token_type", []))
        return cls._with_gguf_specials(backend, metadata, add_bos_default=False)

    @classmethod
    def _from_gguf_sentencepiece(cls, metadata: dict[str, Any]) -> Tokenizer:
        """SentencePiece BPE: spaces are "▁", pieces merge best score first, and a byte with
        no piece is spelled by its <0xNN> token (byte fallback)."""
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types = metadata.get("tokenizer.ggml.token_type") or [_GGUF_TOKEN_NORMAL] * len(tokens)
        vocab = {token: token_id for token_id, token in enumerate(tokens)}
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
        backend = Backend(models.BPE(
            vocab, _merges_by_score(tokens, metadata["tokenizer.ggml.scores"], types, vocab),
            unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True,
            byte_fallback=True))
        replace = [normalizers.Replace(" ", "▁")]
        if metadata.get("tokenizer.ggml.add_space_prefix", True):
            replace.insert(0, normalizers.Prepend("▁"))
        backend.normalizer = normalizers.Sequence(replace)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
        _add_gguf_special_tokens(backend, tokens, types)
        return cls._with_gguf_specials(backend, metadata, add_bos_default=True)

    @classmethod
    def _with_gguf_specials(cls, backend: Backend, metadata: dict[str, Any],
                            add_bos_default: bool) -> Tokenizer:
        """The tokenizer around ``backend`` with the file's BOS, EOS and chat template."""
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        return cls(
            backend,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_directory(cls, path: Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Build from `tokenizer.json` and `tokenizer_config.json` (chat template, BOS, EOS)."""
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"no tokenizer.json in {path} (save the tokenizer with a fast tokenizer, "
                "e.g. AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}") from exc
        config = read_json(path / "tokenizer_config.json")
        bos_id = _token_id(backend, config.get("bos_token"))
        eos_id = _token_id(backend, config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: trust what tokenizer.json's post-processor does
            ids = backend.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and ids[:1] == [bos_id]
        eos_ids = [eos_id] if eos_id is not None else []
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[*eos_ids, *extra_eos_token_ids],
            add_bos_token=bool(add_bos),
            chat_template=_read_chat_template(path, config),
        )

    def save(self, out_dir: Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` that `from_hf_directory` reads."""
        self.backend.save(str(out_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends generation: EOS and the chat template's end-of-turn token."""
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS goes first only when the model asks for it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self._bos_token_id is not None:
            return [self._bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render a conversation as the model was trained to see it (``tools``: for a
        template that renders them).

        Raises:
            ValueError: the model has no chat template, or the template rejects the messages.
        """
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        try:
            return self._template.render(
                messages=[_flatten_content(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token or "",
                eos_token=self._eos_token or "",
                tools=tools,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template writes BOS itself when the model wants one.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, one request at a time.

    Decodes a window that starts a few tokens back, so a token's leading space and multi-byte
    characters split across tokens come out right; a piece is held back while the window's
    text ends in U+FFFD (an incomplete UTF-8 sequence).

        ids:  | emitted, context | emitted | pending |
              0          prefix_offset  read_offset  len(ids)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_id: int) -> str:
        """Text completed by `token_id`; empty while a character is still incomplete."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, incomplete characters shown as U+FFFD."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(emitted) or (window.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _merges_by_score(tokens: list[str], scores: list[float], types: list[int],
                     vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a normal piece into two
    pieces, the merge ranked by the merged piece's score (best first), ties by the ids."""
    ranked = []
    for token_id, token in enumerate(tokens):
        if types[token_id] != _GGUF_TOKEN_NORMAL:
            continue
        for i in range(1, len(token)):
            left, right = vocab.get(token[:i]), vocab.get(token[i:])
            if left is not None and right is not None:
                ranked.append((-scores[token_id], left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


def _add_gguf_special_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (`<|im_start|>`) become special; user-defined ones are matched whole."""
    kinds = dict(zip(tokens, token_types, strict=False))  # token_type is optional
    control = [t for t, kind in kinds.items() if kind == _GGUF_TOKEN_CONTROL]
    user = [t for t, kind in kinds.items() if kind == _GGUF_TOKEN_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _with_end_of_turn(
    backend: Backend, eos_token_ids: Iterable[int], chat_template: str | None
) -> tuple[int, ...]:
    ids = list(dict.fromkeys(eos_token_ids))
    for name in END_OF_TURN_TOKENS:
        token_id = backend.token_to_id(name)
        if token_id is not None and chat_template and name in chat_template and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def _compile_template(source: str) -> jinja2.Template:
    """A sandboxed environment with the helpers Hugging Face chat templates expect."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-style content parts ([{"type": "text", "text": ...}]) joined into one string."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    text = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return {**message, "content": text}


def _token_id(backend: Backend, token: str | dict[str, Any] | None) -> int | None:
    if isinstance(token, dict):  # a serialized AddedToken
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _read_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The default chat template, wherever this transformers version saved it."""
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = config.get("chat_template") or read_json(path / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template
