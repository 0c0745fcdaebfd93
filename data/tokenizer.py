"""Byte-level BPE tokenizer: training, loading, saving, and the fixed special tokens.

The tokenizer is a thin wrapper over a ``tokenizers.Tokenizer``. Its file is a standard ``tokenizer.json``, so
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` loads it unchanged.

Special tokens always occupy ids 0..5 in the order of ``SPECIAL_TOKENS``: pre-trained checkpoints can then be
fine-tuned on chat data without resizing the embedding.

Special-token strings inside text: :meth:`Tokenizer.encode` treats them as PLAIN TEXT (``<|endoftext|>`` typed in
a document is split into ordinary byte-level tokens, never id 0), so a web page or source file that mentions
``<|endoftext|>`` cannot forge a document boundary or a chat turn. Code that builds chat sequences inserts the
special ids explicitly. The same file loaded in ``transformers`` maps the strings to their ids, as HF always does
(chat templates rely on that); the two therefore agree only on text without special-token strings.

Usage::

    tok = train_tokenizer(texts, vocab_size=2048)
    tok.save("runs/x/tokenizer.json")
    tok = Tokenizer.load("runs/x/tokenizer.json")
    ids = tok.encode("def f(x):\\n    return x")
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # 0: document boundary, appended after every pre-training document
    "<|pad|>",  # 1: padding
    "<|system|>",  # 2: chat role markers, start of a turn
    "<|user|>",  # 3
    "<|assistant|>",  # 4
    "<|end|>",  # 5: end of turn; generation stops here in chat
]
EOT_ID, PAD_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))

# Smallest trainable vocabulary: the specials plus the 256-symbol byte alphabet (every byte must be encodable).
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def _byte_alphabet() -> dict[str, int]:
    """Map each character of the byte-level alphabet back to the byte it stands for.

    Byte-level BPE represents each byte by one printable character: printable Latin-1 bytes stand for themselves,
    the remaining 68 bytes (controls, space, ...) are shifted to code points 256, 257, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


class Tokenizer:
    """A byte-level BPE tokenizer with the project's special tokens at ids 0..5.

    Build one with :func:`train_tokenizer` or :meth:`Tokenizer.load`; the constructor takes a ready
    ``tokenizers.Tokenizer`` and checks the special tokens.
    """

    EOT_ID = EOT_ID
    PAD_ID = PAD_ID
    SYSTEM_ID = SYSTEM_ID
    USER_ID = USER_ID
    ASSISTANT_ID = ASSISTANT_ID
    END_ID = END_ID
    SPECIAL_TOKENS = SPECIAL_TOKENS

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
        problems = [
            f"{tok!r} has id {backend.token_to_id(tok)}, expected {i}"
            for i, tok in enumerate(SPECIAL_TOKENS)
            if backend.token_to_id(tok) != i
        ]
        if problems:
            raise ValueError(
                f"tokenizer {source}: special tokens must have ids 0..{len(SPECIAL_TOKENS) - 1} in the order "
                f"{SPECIAL_TOKENS}; " + "; ".join(problems)
            )
        # The saved JSON keeps the specials as ordinary added tokens (transformers maps them to ids). For our own
        # encoding, this runtime-only flag makes the backend split them like any other text: never ids 0..5.
        backend.encode_special_tokens = True
        self._tok = backend
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.hash: str = hashlib.sha256(self._canonical_json().encode("utf-8")).hexdigest()

    # --- persistence -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` (ours or a user's), checking the six special tokens sit at ids 0..5."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses with terse messages
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
        return cls(backend, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically: a temporary file in the same folder, fsync, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _canonical_json(self) -> str:
        # Key order and whitespace do not change the tokenizer, so they must not change its hash.
        return json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    # --- encoding ----------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it are encoded as plain text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel on the library's thread pool (no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept and render as their strings."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 byte length of each token's text; special tokens count 0.

        Summing it over a token sequence gives the number of text bytes it encodes (for bits-per-byte).
        Exact for byte-level BPE; for other user-supplied tokenizers it falls back to decoding each id alone.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        alphabet = _byte_alphabet() if isinstance(self._tok.decoder, decoders.ByteLevel) else None
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        for i in range(self.vocab_size):
            if i in specials:
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                continue
            if alphabet is not None and all(c in alphabet for c in token):
                lengths[i] = len(token)  # one alphabet character per byte
            else:
                lengths[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return lengths

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (encodes special strings as plain text)."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]}, source={self.source!r})"


# Where BPE merges may not cross. Fewer boundaries give tokens spanning words ("self.", "    return "), so more
# bytes per token at the same vocabulary; on the stdlib sample at vocabulary 2048 (90% / 10% of the 8 MB sample):
# gpt2 2.99 bytes per token, lines 3.26, none 3.36 (gpt2 at 4096: 3.36). "none" trains slowly: every document is
# one pre-token (87 s against 2 s on that sample, one thread).
#   gpt2   GPT-2's regex: words, numbers, punctuation and whitespace runs apart
#   lines  one pre-token per line (its newline included): merges cross spaces, never a line end
#   none   merges cross everything
PRETOKENIZERS = ("gpt2", "lines", "none")
LINE = r"[^\n]*\n?"  # a line and its newline; the last line of a text may have none


def byte_level_pretokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "none":
        return byte_level
    if kind == "lines":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(LINE), behavior="isolated"),
                                        byte_level])
    raise ValueError(f"pretokenizer={kind!r}: expected one of {list(PRETOKENIZERS)}")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
    pretokenizer: str = "gpt2",
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with the special tokens reserved at ids 0..5.

    The vocabulary holds the six specials, the 256 byte symbols (so any text encodes, nothing maps to "unknown")
    and the learned merges. On a tiny corpus training may stop with fewer merges than asked: ``vocab_size`` of
    the result is then smaller than requested. ``length`` (number of texts) only feeds the progress bar.
    ``pretokenizer`` is where merges may not cross (PRETOKENIZERS): GPT-2's word/number/punctuation regex, line
    ends only, or nowhere.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: it must hold the {len(SPECIAL_TOKENS)} special tokens and "
            f"the 256 byte symbols, so at least {MIN_VOCAB_SIZE}"
        )
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit the uint32 token shards")
    backend = tokenizers.Tokenizer(models.BPE())
    # Bytes map to printable characters; no normaliser, so decode(encode(text)) == text for every string.
    backend.pre_tokenizer = byte_level_pretokenizer(pretokenizer)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # added first, so they take ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(backend)
