"""Talk with an SFT, DPO or RL run in the terminal.

    python scripts/chat.py runs/sft
    python scripts/chat.py runs/sft --temperature 0                       # greedy
    python scripts/chat.py runs/dpo --temperature 0.7 --top-p 0.9 --max-new-tokens 100 --seed 1
    python scripts/chat.py runs/imported                                  # scripts/import_hf.py of a chat model

Type a message after the `> ` prompt; the reply is printed token by token as it is generated. Commands:
/reset forgets the conversation, /quit (or Ctrl-D, end of input) leaves; another word after "/" is refused as an
unknown command, and a doubled slash sends the message from its second character ("//etc/hosts" sends "/etc/hosts").
Ctrl-C during a reply stops it and returns to the prompt: that message and its partial reply are dropped from the
conversation (the model never finished the reply, and a cut-off answer is no context to build on), so type it again
or another one. Ctrl-C at the prompt leaves (exit status 130).

Each reply is generated from the whole conversation so far, rendered in the chat format of data/chat.py
(`<|user|>message<|end|><|assistant|>reply<|end|>...<|user|>message<|end|><|assistant|>`), and stops at <|end|> or
after --max-new-tokens (default: sample.py's 128, or half the context when that is shorter than 256 tokens, so a
message has room). The prompt plus --max-new-tokens must fit the model's context (block_size): when the
conversation grows past that, its oldest exchanges (a message and its reply) are dropped and a notice says so.
Sampling as scripts/sample.py: --temperature 0 decodes greedily, otherwise top-k and/or nucleus (top-p) sampling,
reproducible with --seed (one generator for the session, so the first reply equals sample.py --chat's with the
same options). A pre-training run, which never saw the chat format, is refused: use sample.py to continue text. A run
written by scripts/import_hf.py is taken with a notice: the import records no training stage (it says "pretrain"), but
its tokenizer holds the chat format's tokens (the import refuses one without), and a chat-tuned model exported from
gptrain, or tuned elsewhere on that format, answers in it.
Notices go to stderr, replies to stdout. Single process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from data import chat
from data.tokenizer import END_ID
from training.cli import run_script
from training.load import PRECISIONS, LoadedRun, load_run, refuse_reward_model
from training.stages import STAGES

COMMANDS = {"/reset": "forget the conversation", "/quit": "leave (Ctrl-D too)"}
DEFAULT_MAX_NEW_TOKENS = 128  # sample.py's default reply length
# The smallest prompt: <|user|>, one content token, <|end|>, <|assistant|>.
MIN_PROMPT_TOKENS = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", help="an SFT, DPO or RL run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"longest reply in tokens (default: {DEFAULT_MAX_NEW_TOKENS}, as sample.py, or half the "
                        "model's context if that is less)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = p.parse_args(argv)
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
    return args


def refuse_non_chat_run(run: LoadedRun) -> None:
    """Only stages trained on the chat format (training/stages: `chat = True`) can answer a turn; an imported run
    (its stage unknown) is taken with a notice."""
    refuse_reward_model(run, "chatting", needs="SFT, DPO or RL")
    stage = run.cfg.stage
    if run.ckpt.get("imported_from") and not STAGES[stage].chat:
        # Every loaded tokenizer holds the chat tokens at their ids (data/tokenizer.py checks it; import_hf refuses
        # a tokenizer without them), so the chat format can be rendered; whether the model learnt it is not recorded.
        say(f"[{run.ckpt['path']} was imported from {run.ckpt['imported_from']}, and an import records no training "
            f"stage: it is served in the chat format its tokenizer holds. A model never tuned on that format answers "
            "poorly: continue text with scripts/sample.py instead]")
        return
    if not STAGES[stage].chat:
        where = run.run_dir or run.ckpt["path"]
        raise ValueError(f"{run.ckpt['path']} is a {stage!r} run: it was never trained on the chat format, so it "
                         f"cannot answer a message. Continue text with  python scripts/sample.py {where} --prompt "
                         f"TEXT  or fine-tune it first (train.py --stage sft --init-from {where})")


def reply_budget(requested: int | None, block_size: int) -> int:
    """--max-new-tokens, checked against the context: a reply must leave room for at least a one-token message."""
    n = min(DEFAULT_MAX_NEW_TOKENS, block_size // 2) if requested is None else requested
    if not 1 <= n <= block_size - MIN_PROMPT_TOKENS:
        raise ValueError(f"--max-new-tokens={n} must be between 1 and {block_size - MIN_PROMPT_TOKENS}: the model's "
                         f"context is {block_size} tokens and a message needs {MIN_PROMPT_TOKENS} of them at least")
    return n


def fit_history(messages: list[dict], tok, room: int) -> tuple[list[int], int] | None:
    """The prompt ids of `messages` (user, assistant, ..., user) after dropping the fewest oldest exchanges so that
    the prompt holds at most `room` tokens, and how many messages were dropped; None if the last message alone is
    too long."""
    dropped = 0
    while dropped < len(messages):
        ids = chat.render_prompt(messages[dropped:], tok)
        if len(ids) <= room:
            return ids, dropped
        dropped += 2  # a user message and the reply to it: the rest still starts with a user turn
    return None


@torch.no_grad()
def stream_reply(run: LoadedRun, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, generator: torch.Generator) -> Iterator[int]:
    """Yield the reply's token ids one at a time, stopping before <|end|>.

    GPT.stream, the loop GPT.generate collects, with the same generator: greedy and seeded replies are token for
    token those of sample.py --chat. The caller keeps len(prompt) + max_new_tokens within block_size."""
    model = run.model
    assert len(prompt) + max_new_tokens <= model.cfg.block_size, (len(prompt), max_new_tokens)
    idx = torch.tensor([prompt], device=run.device)  # (1, T)
    tokens = model.stream(idx, max_new_tokens, temperature, top_k, top_p, generator)
    while True:
        with run.autocast:  # around each forward only: the caller prints between tokens
            nxt = next(tokens, None)  # (1,)
        if nxt is None or nxt.item() == END_ID:
            return
        yield nxt.item()


class StreamingDecoder:
    """Text of a growing list of token ids, handed out in pieces as they become whole characters.

    A byte-level token can end inside a multi-byte UTF-8 character (its other bytes come with the next token); the
    decoded text then ends in U+FFFD, so that piece is held back until the character is complete. Decoding the whole
    reply each time (not token by token) keeps merged tokens and the decoder's rules exactly as tok.decode has them."""

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """Whatever is still held back (a reply cut off inside a character prints its replacement character)."""
        return self._advance(self.tok.decode(self.ids))

    def _advance(self, text: str) -> str:
        piece, self.shown = text[len(self.shown):], text
        return piece


def say(message: str) -> None:
    """A notice (not part of any reply) on stderr, after whatever stdout holds."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def answer(run: LoadedRun, messages: list[dict], args, generator: torch.Generator) -> str | None:
    """Print the reply to `messages` as it is generated and return its text; None when Ctrl-C stopped it."""
    decoder = StreamingDecoder(run.tok)
    try:
        for token_id in stream_reply(run, chat.render_prompt(messages, run.tok), args.max_new_tokens,
                                     args.temperature, args.top_k, args.top_p, generator):
            print(decoder.push(token_id), end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C during the reply: stop it, not the session
        print(flush=True)
        say("[reply stopped: this message and its partial reply are not kept in the conversation]")
        return None
    print(decoder.finish(), flush=True)
    return decoder.shown


def unknown_command(text: str) -> str:
    """The notice for a message that starts with "/" but is no command: the commands, and how to send it."""
    commands = ", ".join(f"{c} ({w})" for c, w in COMMANDS.items())
    return (f"[unknown command {text!r}; commands: {commands}. To send a message starting with \"/\", double the "
            f"slash: {'/' + text!r} sends {text!r}]")


def add_message(messages: list[dict], text: str, tok, block_size: int, max_new_tokens: int) -> bool:
    """Append the user's message, first dropping the oldest exchanges it would not fit with; False (and the
    conversation unchanged) when the message alone leaves no room for a reply."""
    fitted = fit_history(messages + [{"role": "user", "content": text}], tok, block_size - max_new_tokens)
    if fitted is None:
        n = len(chat.render_prompt([{"role": "user", "content": text}], tok))
        say(f"[message not sent: it takes {n} tokens, and with room for a {max_new_tokens}-token reply it does not "
            f"fit the model's context of {block_size} tokens; write a shorter one or lower --max-new-tokens]")
        return False
    _, dropped = fitted
    if dropped:
        del messages[:dropped]
        say(f"[the conversation no longer fit the model's context of {block_size} tokens with room for a "
            f"{max_new_tokens}-token reply: dropped the oldest {dropped // 2} exchange(s)]")
    messages.append({"role": "user", "content": text})
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = load_run(args.run_dir, args.device, args.precision)
    refuse_non_chat_run(run)
    block_size = run.gcfg.block_size
    args.max_new_tokens = reply_budget(args.max_new_tokens, block_size)
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    say(f"chat with {run.ckpt['path']} (stage {run.cfg.stage}, step {run.step}; context {block_size} tokens, replies "
        f"up to {args.max_new_tokens}). " + ", ".join(f"{c}: {what}" for c, what in COMMANDS.items()))
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D or the end of piped input
            print()
            return
        text = line.strip()
        if text == "/quit":
            return
        if text == "/reset":
            messages.clear()
            say("[conversation forgotten]")
        elif text.startswith("/") and not text.startswith("//"):
            say(unknown_command(text))
        elif text and add_message(messages, text[1:] if text.startswith("//") else text, run.tok, block_size,
                                  args.max_new_tokens):
            reply = answer(run, messages, args, generator)
            if reply is None:
                messages.pop()  # the interrupted message goes with its partial reply
            else:
                messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    try:
        run_script(main)
    except KeyboardInterrupt:  # Ctrl-C at the prompt (or while loading): leave without a traceback
        print(file=sys.stderr)
        sys.exit(130)
