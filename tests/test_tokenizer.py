"""Tokenizer tests: round trips, special tokens as plain text, transformers parity, bad files, byte lengths."""

import json

import numpy as np
import pytest
import tokenizers

from data.tokenizer import (
    ASSISTANT_ID,
    END_ID,
    EOT_ID,
    MIN_VOCAB_SIZE,
    PAD_ID,
    PRETOKENIZERS,
    SPECIAL_TOKENS,
    SYSTEM_ID,
    USER_ID,
    Tokenizer,
    train_tokenizer,
)
from tests.conftest import optional_import

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, Ångström, Øresund, señor.",
    "Emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "中文字符，日本語のテキスト、한국어 문장。",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\r\n",
    "  leading and trailing spaces   \n\n\t",
    "\x00\x01 control bytes \x7f",
    "",
]
# Training text deliberately contains the special strings, as real web/code text can.
CORPUS = [*SAMPLES * 20, "a <|endoftext|> b <|user|> c <|end|> d"] * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400, min_frequency=1)


def test_special_token_ids_fixed(tok):
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert (EOT_ID, PAD_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID) == (0, 1, 2, 3, 4, 5)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(s) == i
    assert tok.EOT_ID == 0 and tok.END_ID == 5
    assert tok.vocab_size == 400


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    # Batch encoding gives the same ids as one-by-one.
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_unseen_text_round_trips(tok):
    text = "Zebra Ωμέγα ∑∫ 🦀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff"
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_stay_plain_text(tok):
    text = "x" + "".join(SPECIAL_TOKENS) + " <|endoftext|>\n<|assistant|>y"
    ids = tok.encode(text)
    assert min(ids) >= len(SPECIAL_TOKENS), ids
    assert tok.decode(ids) == text
    for batch_ids in tok.encode_batch([text, "<|end|>"]):
        assert min(batch_ids) >= len(SPECIAL_TOKENS)


def test_decode_renders_special_tokens(tok):
    ids = tok.encode("hi") + [EOT_ID, USER_ID, END_ID]
    assert tok.decode(ids) == "hi<|endoftext|><|user|><|end|>"


def test_token_byte_lengths_sum_to_utf8_bytes(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (tok.vocab_size,)
    assert (lengths[: len(SPECIAL_TOKENS)] == 0).all()
    assert (lengths[len(SPECIAL_TOKENS) :] >= 1).all()
    for text in SAMPLES:
        ids = tok.encode(text) + [EOT_ID]  # specials add no bytes
        assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_save_load_same_hash_and_ids(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left
    again = Tokenizer.load(path)
    assert again.hash == tok.hash and len(again.hash) == 64
    text = "".join(SAMPLES) + "<|endoftext|>"
    assert again.encode(text) == tok.encode(text)
    assert min(again.encode(text)) >= len(SPECIAL_TOKENS)
    # The hash ignores formatting: rewriting the same JSON compactly keeps it.
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(json.loads(path.read_text())), encoding="utf-8")
    assert Tokenizer.load(compact).hash == tok.hash


def test_different_tokenizers_have_different_hashes(tok):
    other = train_tokenizer(CORPUS, vocab_size=350, min_frequency=1)
    assert other.hash != tok.hash


def test_transformers_parity(tok, tmp_path):
    transformers = optional_import("transformers")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in [*SAMPLES, "Zebra Ωμέγα 🦀 \n\n  x"]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    # In transformers the special strings map to their ids, as HF always does (chat templates rely on it).
    assert hf.encode("a<|endoftext|>", add_special_tokens=False)[-1] == EOT_ID
    assert hf.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))


CODE = ["def f(self, x):\n    return self.x + x\n", "class A:\n    def g(self):\n        return None\n",
        "for i in range(10):\n    print(i, self.x)\n"] * 40


@pytest.fixture(scope="module")
def by_pretokenizer() -> dict[str, Tokenizer]:
    return {kind: train_tokenizer(CODE, vocab_size=320, min_frequency=1, pretokenizer=kind) for kind in PRETOKENIZERS}


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text)]


def test_pretokenizers_bound_merges_and_round_trip(by_pretokenizer, tmp_path):
    """gpt2: no token joins a letter to a space before it or ends a line inside; lines: merges cross spaces but
    a newline only ends a token; none: some token runs across a line end. Every kind round-trips every sample and
    gives transformers the same ids."""
    text = "".join(CODE[:3])
    gpt2, lines, none = (pieces(by_pretokenizer[k], text) for k in ("gpt2", "lines", "none"))
    assert all("\n" not in p.rstrip("\n ") for p in gpt2) and not any(" " in p.strip() for p in gpt2)
    assert all("\n" not in p[:-1] for p in lines) and any(" " in p.strip() for p in lines)
    assert any("\n" in p[:-1] for p in none)
    # fewer boundaries, fewer tokens (the same vocabulary size)
    assert len(none) < len(lines) < len(gpt2), (len(none), len(lines), len(gpt2))
    transformers = optional_import("transformers")
    for kind, tok in by_pretokenizer.items():
        tok.save(tmp_path / f"{kind}.json")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / f"{kind}.json"))
        for sample in [*SAMPLES, text]:
            ids = tok.encode(sample)
            assert tok.decode(ids) == sample, kind
            assert hf.encode(sample, add_special_tokens=False) == ids, kind
        assert min(tok.encode("x<|end|>y")) >= len(SPECIAL_TOKENS)


def test_unknown_pretokenizer():
    with pytest.raises(ValueError, match="pretokenizer='words'.*gpt2"):
        train_tokenizer(CORPUS, vocab_size=300, pretokenizer="words")


def test_vocab_too_small():
    with pytest.raises(ValueError, match=f"vocab_size=100 .*at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(CORPUS, vocab_size=100)
    assert train_tokenizer(CORPUS, vocab_size=MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize("content", ["{not json", '{"model": 3}', ""])
def test_load_unreadable_file(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="cannot read tokenizer file .*broken.json"):
        Tokenizer.load(path)


def test_load_user_tokenizer_without_our_specials(tok, tmp_path):
    # A user tokenizer.json whose specials are missing or at other ids is rejected, naming the token.
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|user|>"], show_progress=False
    )
    backend.train_from_iterator(SAMPLES, trainer=trainer)
    path = tmp_path / "user.json"
    backend.save(str(path))
    with pytest.raises(ValueError, match=r"user\.json.*'<\|pad\|>' has id None, expected 1.*'<\|user\|>' has id 1"):
        Tokenizer.load(path)


def test_load_user_tokenizer_with_our_specials(tok, tmp_path):
    # A user-supplied file with the specials at 0..5 is accepted as is.
    path = tmp_path / "user.json"
    tok.backend.save(str(path))
    user = Tokenizer.load(path)
    assert user.hash == tok.hash and user.source == str(path)
