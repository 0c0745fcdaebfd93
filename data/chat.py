"""The chat format: conversations -> token ids + loss mask, and the matching Jinja chat template.

A conversation is a list of messages ``{"role": ..., "content": ...}`` with ``role`` in ``system``, ``user``,
``assistant``. Each message is rendered as its role marker, its content, and the end-of-turn token::

    <|system|>You are terse.<|end|><|user|>What is 2+3?<|end|><|assistant|>5<|end|>

Nothing else is added: no newline after a marker, no separator between turns, no begin-of-sequence token. The
markers and ``<|end|>`` are the reserved special ids of ``data.tokenizer`` (SYSTEM_ID, USER_ID, ASSISTANT_ID,
END_ID); the content is encoded on its own with ``tok.encode`` (so a literal "<|end|>" typed inside a message stays
plain text and can never forge a turn boundary). A generation prompt is the conversation so far followed by
``<|assistant|>``; the model then writes the reply and stops at ``<|end|>``.

Loss mask (what SFT and DPO supervise): the content tokens of every assistant message and that message's ``<|end|>``
token. Role markers, system and user turns are never supervised. ``to_example`` turns ``(ids, mask)`` into shifted
``(input_ids, labels)`` with -100 on unsupervised positions.

``CHAT_TEMPLATE`` is the same format as a Hugging Face (``transformers``) Jinja chat template. Through
``apply_chat_template`` it produces exactly the ids ``render``/``render_prompt`` produce, because the fast tokenizer
splits special-token strings out before byte-level BPE and our pre-tokenizer adds no prefix space, so each content
string is encoded exactly as ``tok.encode(content)`` encodes it (tested). The one exception is content that itself
contains a special-token string: ``transformers`` turns it into the special id, ``render`` keeps it as text. The
template also marks the supervised span with ``{% generation %}`` so ``return_assistant_tokens_mask=True`` gives the
same mask as ``render``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from data.tokenizer import ASSISTANT_ID, END_ID, SPECIAL_TOKENS, SYSTEM_ID, USER_ID

ROLE_IDS: dict[str, int] = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
# Label of unsupervised positions, defined here only: model/losses.py imports it as IGNORE (the default
# ignore_index of its losses); -100 is also F.cross_entropy's default.
IGNORE_INDEX = -100


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    """Validate a conversation and return it as (role, content) pairs. ValueError names the message index."""
    if isinstance(messages, dict) or isinstance(messages, str) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation must be a list of {{role, content}} messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            found = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', found {found}")
        role, content = m["role"], m["content"]
        if role not in ROLE_IDS:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {sorted(ROLE_IDS)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} (role {role!r}) content must be a string, got {type(content).__name__}")
        out.append((role, content))
    return out


def render(messages: Sequence[dict], tok: _Encoder) -> tuple[list[int], list[bool]]:
    """Render a training conversation to ``(ids, loss_mask)``; ``loss_mask[i]`` is True where ``ids[i]`` is supervised.

    Raises ValueError for an unknown role (naming it and the message index) or a conversation without an assistant
    turn (nothing to learn from).
    """
    turns = _check_messages(messages)
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError(f"conversation has no assistant turn (roles: {[r for r, _ in turns]}); nothing to supervise")
    ids: list[int] = []
    mask: list[bool] = []
    for role, content in turns:
        body = tok.encode(content) + [END_ID]
        supervised = role == "assistant"
        ids += [ROLE_IDS[role]] + body
        mask += [False] + [supervised] * len(body)  # the role marker itself is given, never predicted
    return ids, mask


def render_prompt(messages: Sequence[dict], tok: _Encoder) -> list[int]:
    """Ids of the conversation so far plus ``<|assistant|>``: the prompt from which the model writes its reply."""
    ids: list[int] = []
    for role, content in _check_messages(messages):
        ids += [ROLE_IDS[role]] + tok.encode(content) + [END_ID]
    return ids + [ASSISTANT_ID]


def to_example(ids: Sequence[int], mask: Sequence[bool], block_size: int) -> tuple[list[int], list[int]] | None:
    """Shift a rendered conversation into ``(input_ids, labels)`` of at most ``block_size`` tokens.

    ``labels[t] = ids[t+1]`` if ``mask[t+1]`` else -100, so the label at the last prompt position (the
    ``<|assistant|>`` marker) is the first completion token. Too-long conversations are truncated on the right.
    Returns None when no supervised label survives the truncation (the caller drops and counts the example).
    """
    assert len(ids) == len(mask), (len(ids), len(mask))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = min(len(ids) - 1, block_size)  # the last token is only ever a label, never an input
    if n < 1:
        return None
    input_ids = list(ids[:n])
    labels = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels


def decode_reply(ids: Sequence[int], tok: Any) -> str:
    """Text of a generated reply: the ids up to (not including) the first ``<|end|>``."""
    ids = list(ids)
    if END_ID in ids:
        ids = ids[: ids.index(END_ID)]
    return tok.decode(ids)


def _build_template() -> str:
    # One line, no literal whitespace between tags: anything outside {{ }} would become tokens in transformers.
    system, user, assistant, end = (SPECIAL_TOKENS[i] for i in (SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID))
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}" + system + "{{ message['content'] }}" + end
        + "{%- elif message['role'] == 'user' -%}" + user + "{{ message['content'] }}" + end
        + "{%- elif message['role'] == 'assistant' -%}" + assistant
        + "{%- generation -%}{{ message['content'] }}" + end + "{%- endgeneration -%}"
        "{%- else -%}{{ raise_exception('unknown role ' ~ message['role'] ~ ' in message ' ~ loop.index0) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + assistant + "{%- endif -%}"
    )


CHAT_TEMPLATE: str = _build_template()
