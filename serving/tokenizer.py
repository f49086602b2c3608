"""Text <-> token ids for one checkpoint: encoding, decoding, the chat template, stop ids, streaming text.

A thin wrapper around the Hugging Face tokenizer stored in the checkpoint folder (tokenizer.json and
tokenizer_config.json, loaded offline). Prompts are encoded exactly as given: no BOS or other special
token is added, so `encode` is what `generate --prompt` and /v1/completions send to the model, and
`apply_chat_template` is what /v1/chat/completions sends.

>>> tok = Tokenizer("demo/")
>>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
>>> detok = IncrementalDetokenizer(tok)
>>> deltas = [detok.push([i]) for i in generated_ids] + [detok.flush()]   # "".join(deltas) == tok.decode(...)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from jinja2 import TemplateError

from serving.errors import CheckpointError, ConfigError, RequestError

# Either one is enough for AutoTokenizer to build a fast tokenizer; we name both when neither is there.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files whose `eos_token_id` (an int or a list of ints) also ends generation.
_EOS_SOURCES = ("config.json", "generation_config.json")
_REPLACEMENT_CHAR = "\ufffd"  # what byte-level decoding yields for an incomplete UTF-8 sequence
# Prompt tokens kept as left context: some decoders (e.g. SentencePiece's leading space) depend on it.
_DETOKENIZER_CONTEXT = 5


class Tokenizer:
    """The tokenizer of the checkpoint folder `path`.

    `eos_token_ids` holds every id that ends generation: the tokenizer's eos token plus `eos_token_id`
    from config.json and generation_config.json (each optional). `vocab_size` counts every id the
    tokenizer can produce, special tokens included; the model's embedding may be larger, never smaller.

    Raises CheckpointError naming the folder and file when the folder or its tokenizer files are
    missing or unreadable.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"tokenizer folder {self.path} does not exist")
        if not any((self.path / name).is_file() for name in _TOKENIZER_FILES):
            raise CheckpointError(f"{self.path} has no tokenizer: expected {' or '.join(_TOKENIZER_FILES)} in it")
        try:
            self._hf = _load_hf_tokenizer(self.path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer in {self.path}: {exc}") from exc
        self.vocab_size: int = len(self._hf)
        self.eos_token_ids: frozenset[int] = frozenset(self._eos_ids())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as given: no special tokens added (spellings like <|im_end|> are parsed)."""
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; a trailing incomplete UTF-8 character comes out as U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` ([{"role": ..., "content": ...}, ...]) rendered with the checkpoint's
        own chat template, ending with the prompt for the assistant's reply (add_generation_prompt=True).

        Raises RequestError when the checkpoint has no chat template or the template rejects the messages.
        """
        if not self._hf.chat_template:
            raise RequestError(
                f"the checkpoint {self.path} has no chat template (no chat_template.jinja, and no "
                "chat_template in tokenizer_config.json); send a raw prompt to /v1/completions instead"
            )
        try:
            text = self._hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise RequestError(f"the chat template of {self.path} rejected the messages: {exc}") from exc
        return self.encode(text)

    def _eos_ids(self) -> set[int]:
        ids = {self._hf.eos_token_id} if self._hf.eos_token_id is not None else set()
        for name in _EOS_SOURCES:
            file = self.path / name
            if not file.is_file():
                continue
            try:
                value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
            ids.update(_as_id_list(value, file))
        return ids


def _load_hf_tokenizer(path: Path):
    """The checkpoint's fast tokenizer. With a tokenizer.json, transformers' generic fast tokenizer reads it
    directly: the same ids as the model's own tokenizer class for what we do (no special tokens added), and
    it does not import torch, which keeps the Ingress process free of the model stack. Without one,
    AutoTokenizer has to convert a slow tokenizer, and that path imports torch."""
    if (path / "tokenizer.json").is_file():
        from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _as_id_list(value: object, file: Path) -> list[int]:
    """`eos_token_id` from a JSON file: absent/null, one int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{file}: field eos_token_id must be a token id or a list of them, got {value!r}")
    return values


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas for streaming.

    Byte-level BPE can split one character (an accent, a CJK ideograph, an emoji) across tokens; a
    decode that stops inside it ends in U+FFFD. Such text is held back until the character completes,
    so no delta ever carries half a character, and `"".join(all deltas) + flush()` equals
    `tokenizer.decode(all generated ids)`.

    Only a short window of ids is decoded per step (from `_prefix` on), so a step costs O(window),
    not O(length). Invariant: the text of ids[:_read] is emitted (prompt context aside), and decoding
    ids[_prefix:_read] gives `_prefix_text`.
    `prompt_ids`, when given, serve as left context only; they are never emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_DETOKENIZER_CONTEXT:])
        if self._decode(0, len(self._ids)).endswith(_REPLACEMENT_CHAR):
            self._ids = []  # a prompt ending mid-character would swallow the output's first bytes
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)

    def push(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete ("" while a character is still partial)."""
        self._ids.extend(new_ids)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Return the text held back (an incomplete character comes out as U+FFFD); call once at the end."""
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        # The next window starts where this emission started: one delta of context is enough.
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        return delta

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)
