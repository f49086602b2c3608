"""The checkpoint tokenizer wrapper: round trips, chat template, eos ids, streaming detokenization."""

import json
import random
import shutil

import pytest

from serving.demo import DEMO_VOCAB_SIZE, TOKENIZER_FILES
from serving.errors import CheckpointError, ConfigError, RequestError
from serving.tokenizer import IncrementalDetokenizer, Tokenizer

# Accents, CJK, emoji with ZWJ and skin tone, a flag, RTL text, combining marks, odd whitespace.
UNICODE_TEXTS = [
    "Crème brûlée, naïve façade, Ærøskøbing, Straße",
    "東京で寿司を食べました。你好，世界！한국어 텍스트",
    "Emoji: 😊👍🏽 👩‍👩‍👧‍👦 🇯🇵 ❤️ 🚀",
    "مرحبا بالعالم — שלום עולם",
    "e\u0301 vs é, ﬁ ligature, \u200bzero width, tabs\tand\r\nCRLF, trailing spaces   ",
    "  leading spaces, \n\n\nblank lines, ` code ` . , ; ! ?",
    "",
]
MULTIBYTE_TEXT = "Tokyo is 東京 🗼; café ☕ costs 3 € — ok 👍🏽 done."


@pytest.fixture(scope="session")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_decode_encode_round_trips_unicode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_adds_no_special_tokens_but_parses_their_spellings(tok):
    assert tok.vocab_size == DEMO_VOCAB_SIZE
    ids = tok.encode("Mixture of experts")
    assert not {0, 1, 2} & set(ids)
    assert tok.encode("<|im_start|>") == [1]
    assert tok.decode(tok.encode("a<|im_end|>b")) == "ab"
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special_tokens=False) == "a<|im_end|>b"


def test_chat_template_renders_system_and_user_then_assistant_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 東京?"}]
    ids = tok.apply_chat_template(messages)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 東京?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert ids[0] == 1
    assert ids[-len(tok.encode("<|im_start|>assistant\n")) :] == tok.encode("<|im_start|>assistant\n")


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(RequestError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_chat_template_names_the_folder(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    with pytest.raises(RequestError, match=str(tmp_path)):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_eos_ids_join_tokenizer_config_and_generation_config(tokenizer_dir, tmp_path):
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    assert Tokenizer(tmp_path).eos_token_ids == frozenset({0})
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer(tmp_path).eos_token_ids == frozenset({0, 2, 7})
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ConfigError, match=r"config\.json: field eos_token_id"):
        Tokenizer(tmp_path)


def test_missing_folder_or_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no tokenizer: expected tokenizer.json"):
        Tokenizer(tmp_path)


def _stream(tok, ids, **kwargs) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.push([i]) for i in ids]
    return deltas, detok.flush()


def test_incremental_detokenizer_equals_full_decode_on_every_prefix(tok):
    ids = tok.encode(MULTIBYTE_TEXT)
    # The test means something only if some character is split across tokens.
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(len(ids)))
    for k in range(len(ids) + 1):
        deltas, tail = _stream(tok, ids[:k])
        full = tok.decode(ids[:k])
        assert not any("\ufffd" in d for d in deltas)
        assert full.startswith("".join(deltas))
        assert "".join(deltas) + tail == full
    assert tail == ""


def test_incremental_detokenizer_pushes_many_ids_at_once_and_skips_specials(tok):
    ids = tok.encode(MULTIBYTE_TEXT)
    detok = IncrementalDetokenizer(tok)
    text = detok.push(ids[:7]) + detok.push([2]) + detok.push(ids[7:]) + detok.push([0]) + detok.flush()
    assert text == MULTIBYTE_TEXT


def test_incremental_detokenizer_uses_prompt_only_as_context(tok):
    prompt, output = tok.encode("Question: 東京?"), tok.encode(" Answer: 🗼 yes")
    deltas, tail = _stream(tok, output, prompt_ids=prompt)
    assert "".join(deltas) + tail == " Answer: 🗼 yes"


def test_incremental_detokenizer_flushes_an_incomplete_character(tok):
    ids = tok.encode("🗼")
    assert len(ids) > 1  # one emoji, several byte tokens
    deltas, tail = _stream(tok, ids[:1])
    assert deltas == [""] and tail == "\ufffd"


def test_incremental_detokenizer_matches_decode_for_random_ids(tok):
    """A random model emits arbitrary ids: lone UTF-8 bytes, invalid sequences, specials, odd prompts."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 24))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]  # may end mid-character
        detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
        chunks = [ids[i : i + 2] for i in range(0, len(ids), 2)]
        assert "".join(detok.push(c) for c in chunks) + detok.flush() == tok.decode(ids), (prompt, ids)
