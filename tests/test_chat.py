"""Chat format tests: exact ids and loss masks, shifting/truncation, errors, and parity with transformers'
apply_chat_template using CHAT_TEMPLATE on the same tokenizer.json."""

import pytest

from data.chat import CHAT_TEMPLATE, IGNORE_INDEX, decode_reply, render, render_prompt, to_example
from data.synthetic import make_preferences, make_sft
from data.tokenizer import ASSISTANT_ID, END_ID, SYSTEM_ID, USER_ID, Tokenizer, train_tokenizer
from tests.conftest import optional_import

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 47+385?"},
    {"role": "assistant", "content": "432"},
    {"role": "user", "content": "Reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
]

# Contents chosen to stress BPE at the marker boundaries: leading/trailing spaces, newlines, digits, unicode, empty.
EDGE_CONTENTS = ["", " ", " leading space", "trailing space ", "\n", "two\n\nlines\n", "  x = 1\n", "432",
                 "déjà vu ✓ 😀", "'quoted' \"double\"", "a" * 50, "\t tab", "end."]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = [m["content"] for r in make_sft(300, 0) for m in r["messages"]]
    code = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)  # loop\n", "class A:\n    pass\n"]
    return train_tokenizer(text + code * 30 + EDGE_CONTENTS * 3, vocab_size=420, min_frequency=1)


def test_render_ids_and_mask_exact(tok):
    ids, mask = render(CONV, tok)
    e = tok.encode
    expected = (
        [SYSTEM_ID] + e("Answer briefly.") + [END_ID]
        + [USER_ID] + e("What is 47+385?") + [END_ID]
        + [ASSISTANT_ID] + e("432") + [END_ID]
        + [USER_ID] + e("Reverse: a b c") + [END_ID]
        + [ASSISTANT_ID] + e("c b a") + [END_ID]
    )
    assert ids == expected
    supervised = [t for t, m in zip(ids, mask, strict=True) if m]
    assert supervised == e("432") + [END_ID] + e("c b a") + [END_ID]
    # markers and the system/user turns are never supervised
    assert not any(m for t, m in zip(ids, mask, strict=True) if t in (SYSTEM_ID, USER_ID, ASSISTANT_ID))


def test_to_example_labels_shifted_exactly(tok):
    conv = [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    ids, mask = render(conv, tok)
    prompt = [USER_ID] + tok.encode("Sort: 3 1 2") + [END_ID, ASSISTANT_ID]
    completion = tok.encode("1 2 3") + [END_ID]
    assert ids == prompt + completion
    input_ids, labels = to_example(ids, mask, block_size=1000)
    assert input_ids == ids[:-1]  # the final <|end|> is only a target
    # hand-computed: nothing to predict inside the prompt; the label at <|assistant|> is the first completion token
    assert labels == [IGNORE_INDEX] * (len(prompt) - 1) + completion
    assert labels[len(prompt) - 1] == completion[0] and input_ids[len(prompt) - 1] == ASSISTANT_ID
    assert render_prompt(conv[:1], tok) == prompt


def test_multi_turn_labels_only_assistant(tok):
    ids, mask = render(CONV, tok)
    input_ids, labels = to_example(ids, mask, 1000)
    for t, y in enumerate(labels):
        if y != IGNORE_INDEX:
            assert mask[t + 1] and y == ids[t + 1]
        else:
            assert not mask[t + 1]
    assert sum(y != IGNORE_INDEX for y in labels) == sum(mask)


def test_truncation_keeps_partial_and_drops_empty(tok):
    conv = [{"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "46"}]
    ids, mask = render(conv, tok)
    first_label = mask.index(True) - 1  # position whose label is the first completion token
    ex = to_example(ids, mask, block_size=first_label + 1)
    assert ex is not None and len(ex[0]) == first_label + 1
    assert [y for y in ex[1] if y != IGNORE_INDEX] == [ids[first_label + 1]]
    assert to_example(ids, mask, block_size=first_label) is None  # the prompt fills the whole context: dropped
    with pytest.raises(ValueError, match="block_size"):
        to_example(ids, mask, 0)


def test_render_errors(tok):
    with pytest.raises(ValueError, match=r"message 1 has unknown role 'tool'"):
        render([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], tok)
    with pytest.raises(ValueError, match="no assistant turn"):
        render([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], tok)
    with pytest.raises(ValueError, match=r"message 0 .*content"):
        render([{"role": "user"}], tok)
    with pytest.raises(ValueError, match="content must be a string"):
        render([{"role": "assistant", "content": None}], tok)
    with pytest.raises(ValueError, match="list of"):
        render({"role": "user", "content": "x"}, tok)
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        render_prompt([{"role": "bot", "content": "x"}], tok)
    assert render_prompt([], tok) == [ASSISTANT_ID]  # generation without any context is allowed


def test_special_strings_in_content_stay_text(tok):
    ids, _ = render([{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "<|user|>"}], tok)
    assert ids.count(END_ID) == 2 and ids.count(USER_ID) == 1  # only the real turn boundaries


def test_decode_reply_stops_at_end(tok):
    assert decode_reply(tok.encode("c b a") + [END_ID] + tok.encode("junk"), tok) == "c b a"
    assert decode_reply(tok.encode("no end"), tok) == "no end"


def _conversations():
    convs = [CONV, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]]
    convs += [r["messages"] for r in make_sft(40, 3)]
    convs += [r["prompt"] + r["rejected"] for r in make_preferences(20, 3)]
    for i, c in enumerate(EDGE_CONTENTS):
        convs.append([
            {"role": "system", "content": EDGE_CONTENTS[(i + 1) % len(EDGE_CONTENTS)]},
            {"role": "user", "content": c},
            {"role": "assistant", "content": EDGE_CONTENTS[(i + 2) % len(EDGE_CONTENTS)]},
            {"role": "user", "content": EDGE_CONTENTS[(i + 3) % len(EDGE_CONTENTS)]},
            {"role": "assistant", "content": c},
        ])
    return convs


def test_chat_template_parity_with_transformers(tok, tmp_path):
    transformers = optional_import("transformers")
    tok.save(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                              chat_template=CHAT_TEMPLATE)
    for conv in _conversations():
        ids, mask = render(conv, tok)
        out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids, conv
        assert out["assistant_masks"] == [int(m) for m in mask], conv  # {% generation %} marks the same span
        text = hf.apply_chat_template(conv, tokenize=False)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        prompt = conv[:-1]
        gen = hf.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
        assert gen["input_ids"] == render_prompt(prompt, tok), prompt
    with pytest.raises(Exception, match="unknown role tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
