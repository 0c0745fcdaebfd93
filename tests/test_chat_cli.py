"""scripts/chat.py, through a real pseudo-terminal: the first greedy reply is sample.py --chat's, a later reply is
greedy generation on the rendered conversation, /reset forgets it, a conversation that outgrows the context drops its
oldest exchange (and says so), /quit and Ctrl-D leave with exit code 0, Ctrl-C stops a reply (its exchange dropped)
and at the prompt leaves, "//" sends a message starting with "/", an imported chat model is served with a notice, a
pre-training or reward-model run is refused. Replies stream through a decoder that never prints half a character."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from data import chat
from data.tokenizer import END_ID
from model.gpt import GPTConfig
from model.reward import RewardModel
from tests.conftest import optional_import
from training.load import load_run, save_run

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "scripts" / "chat.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
MAX_NEW = 16  # reply budget of every session here; the fixture's context is 64 tokens


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gptrain_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat_cli, sample_cli = load_script("chat"), load_script("sample")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def sft_run(_one_thread, tiny_run, tmp_path_factory) -> Path:
    """tiny_run fine-tuned for 30 steps on the built-in chat tasks: enough to answer in the chat format."""
    from train import main

    out = tmp_path_factory.mktemp("chat") / "sft"
    main(["--stage", "sft", "--init-from", str(tiny_run), "--out", str(out), "--train.max_steps=30",
          "--train.lr=3e-3", "--train.warmup_steps=5", "--data.synthetic_train=300", "--data.synthetic_val=16",
          "--eval.interval=0", "--log.health_interval=0", "--log.hist_interval=0", "--log.tensorboard=false",
          "--eval.sample_tokens=8"])
    return out


def greedy_reply(run, messages: list[dict], max_new: int) -> str:
    """The reference: a full forward per token (no KV cache, not the script's loop) on the rendered conversation,
    argmax, stopping at <|end|>."""
    ids = chat.render_prompt(messages, run.tok)
    reply: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = run.model(torch.tensor([ids + reply]))[0, -1].argmax().item()
            if nxt == END_ID:
                break
            reply.append(nxt)
    return run.tok.decode(reply)


def foreground_job() -> None:
    """In the child before exec: take the pty as controlling terminal and give SIGINT its default action, as a shell
    does for the job it runs in the foreground. Without the reset, a test run started as a background job of a
    non-interactive shell (`pytest &` in a script) hands chat.py an ignored SIGINT, which Python keeps ignored, and
    a typed Ctrl-C does nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """chat.py with a pseudo-terminal as its stdin, stdout and stderr and as its controlling terminal (so a typed
    Ctrl-C is a SIGINT to it, as in a shell); the test types and reads on the other side. Output post-processing
    (\\n -> \\r\\n) is turned off so the bytes read are the bytes the script wrote, and so is the flush of unread
    output at Ctrl-C. `code`: run the script under this `python -c` wrapper (its argv: wrapper_args, the script, the
    options)."""

    def __init__(self, *argv, code: str | None = None, wrapper_args: list = ()) -> None:
        master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST
        attrs[3] |= termios.NOFLSH
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        wrapper = [] if code is None else ["-c", code, *map(str, wrapper_args)]
        self.proc = subprocess.Popen([sys.executable, *wrapper, str(CHAT), *map(str, argv)], stdin=slave,
                                     stdout=slave, stderr=slave, cwd=ROOT, env=ENV, close_fds=True,
                                     start_new_session=True,  # a session of its own, whose terminal is the pty
                                     preexec_fn=foreground_job)
        os.close(slave)
        self.fd, self.buffer = master, b""

    def read_until_prompt(self, at_least: int = 0, timeout: float = 120) -> str:
        """Everything written since the last call, up to and including the next "> " prompt at the end of the
        output (after at least `at_least` characters), or up to the script's exit."""
        deadline = time.monotonic() + timeout
        while not (self.buffer.endswith(b"> ") and len(self.buffer.decode(errors="replace")) >= at_least):
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no prompt within {timeout} s; the terminal shows {self.buffer!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the script has exited and closed the terminal
                chunk = b""
            if not chunk:
                break
            self.buffer += chunk
        text, self.buffer = self.buffer.decode(), b""
        return text

    def read_until(self, text: str, timeout: float = 120) -> str:
        """Read until the output so far holds `text`; return it (the buffer is emptied)."""
        deadline = time.monotonic() + timeout
        while text not in self.buffer.decode(errors="replace"):
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows {self.buffer!r}")
            self.buffer += os.read(self.fd, 4096)
        shown, self.buffer = self.buffer.decode(), b""
        return shown

    def send(self, line: str, expected: str) -> str:
        """Type a line; return what the terminal shows until the next prompt, which must be `expected` (the echo
        of the line, the reply, a newline and "> ")."""
        os.write(self.fd, line.encode() + b"\n")
        shown = self.read_until_prompt(at_least=len(expected))
        assert shown == expected
        return shown

    def close(self, keys: bytes, timeout: float = 60) -> int:
        os.write(self.fd, keys)
        rest = self.read_until_prompt(timeout=timeout)
        assert not rest.endswith("> "), rest
        code = self.proc.wait(timeout=timeout)
        os.close(self.fd)
        return code


def exchange(line: str, reply: str, notice: str = "") -> str:
    return f"{line}\n{notice}{reply}\n> "


def test_conversation_in_a_terminal(sft_run):
    run = load_run(sft_run, "cpu", "fp32")
    block = run.gcfg.block_size
    u1, u2 = "Sort: 9 4 7", "Reverse: a b c"
    (a1,) = sample_cli.main([str(sft_run), "--chat", "--prompt", u1, "--temperature", "0", "--max-new-tokens",
                             str(MAX_NEW), "--device", "cpu"])
    history = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    a2 = greedy_reply(run, history, MAX_NEW)
    assert a2 != greedy_reply(run, history[2:], MAX_NEW)  # the history changes the answer, so the test can tell

    # A long message that fits the context alone but not after the first exchange: that exchange must be dropped.
    long = "x" + " x" * next(k for k in range(block) if len(chat.render_prompt(
        [{"role": "user", "content": "x" + " x" * (k + 1)}], run.tok)) + MAX_NEW > block)
    alone = len(chat.render_prompt([{"role": "user", "content": long}], run.tok))
    after_first = len(chat.render_prompt(history[:2] + [{"role": "user", "content": long}], run.tok))
    assert alone + MAX_NEW <= block < after_first + MAX_NEW, (alone, after_first)
    a_long = greedy_reply(run, [{"role": "user", "content": long}], MAX_NEW)

    term = Terminal(sft_run, "--temperature", 0, "--max-new-tokens", MAX_NEW, "--device", "cpu")
    banner = term.read_until_prompt()
    assert banner.startswith("chat with ") and "/reset" in banner and banner.endswith("\n> ")
    term.send(u1, exchange(u1, a1))
    term.send(u2, exchange(u2, a2))
    term.send("/reset", "/reset\n[conversation forgotten]\n> ")
    term.send(u1, exchange(u1, a1))
    dropped = (f"[the conversation no longer fit the model's context of {block} tokens with room for a {MAX_NEW}-token "
               "reply: dropped the oldest 1 exchange(s)]\n")
    term.send(long, exchange(long, a_long, dropped))
    too_long = "x" + " x" * block
    n_too_long = len(chat.render_prompt([{"role": "user", "content": too_long}], run.tok))
    term.send(too_long, f"{too_long}\n[message not sent: it takes {n_too_long} tokens, and with room for a {MAX_NEW}-"
                        f"token reply it does not fit the model's context of {block} tokens; write a shorter one or "
                        "lower --max-new-tokens]\n> ")
    # The refused message left the conversation as it was, [long, a_long]: "hi" does not fit after it either.
    kept = [{"role": "user", "content": long}, {"role": "assistant", "content": a_long}, {"role": "user", "content": "hi"}]
    assert len(chat.render_prompt(kept, run.tok)) + MAX_NEW > block
    term.send("hi", exchange("hi", greedy_reply(run, kept[2:], MAX_NEW), dropped))
    assert term.close(b"/quit\n") == 0


def test_end_of_input_quits_cleanly(sft_run):
    term = Terminal(sft_run, "--temperature", 0, "--max-new-tokens", MAX_NEW, "--device", "cpu")
    term.read_until_prompt()
    assert term.close(b"\x04") == 0  # Ctrl-D at an empty prompt: end of input


def test_first_sampled_reply_equals_sample_py(sft_run):
    """One generator for the session, seeded by --seed: the first sampled reply is sample.py --chat's."""
    run = load_run(sft_run, "cpu", "fp32")
    opts = ["--temperature", "1.0", "--top-k", "20", "--seed", "3", "--max-new-tokens", str(MAX_NEW)]
    (expected,) = sample_cli.main([str(sft_run), "--chat", "--prompt", "Sort: 9 4 7", *opts, "--device", "cpu"])
    prompt = chat.render_prompt([{"role": "user", "content": "Sort: 9 4 7"}], run.tok)
    g = torch.Generator().manual_seed(3)
    ids = list(chat_cli.stream_reply(run, prompt, MAX_NEW, 1.0, 20, None, g))
    assert run.tok.decode(ids) == expected


def test_streaming_never_prints_half_a_character(tiny_run):
    tok = load_run(tiny_run, "cpu", "fp32").tok
    text = "naïve café: 日本語 ✓ done"
    ids = tok.encode(text)
    decoder = chat_cli.StreamingDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended inside a character and was held back
    assert sum(1 for p in pieces if p) > 5  # and the rest came out token by token


def test_pretraining_run_is_refused(tiny_run):
    cli = subprocess.run([sys.executable, str(CHAT), str(tiny_run), "--device", "cpu"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert cli.returncode == 1 and cli.stderr.startswith("error: "), cli.stderr
    assert "'pretrain' run" in cli.stderr and "never trained on the chat format" in cli.stderr
    assert f"python scripts/sample.py {tiny_run} --prompt" in cli.stderr


def test_reward_model_and_bad_options_are_refused(tiny_run, tmp_path):
    run = load_run(tiny_run, "cpu", "fp32")
    rm = save_run(tmp_path / "rm", RewardModel(GPTConfig.from_dict(run.gcfg.to_dict())).state_dict(), run.gcfg,
                  run.tok, stage="rm")
    with pytest.raises(ValueError, match=r"is a reward model .* chatting needs a policy run \(SFT, DPO or RL\)"):
        chat_cli.main([str(rm), "--device", "cpu"])
    with pytest.raises(ValueError, match=r"--max-new-tokens=61 must be between 1 and 60"):
        chat_cli.reply_budget(61, 64)
    with pytest.raises(ValueError, match="--top-p"):
        chat_cli.parse_args([str(tiny_run), "--top-p", "0"])


# A model slow enough to interrupt: the first reply pauses (a sleep Ctrl-C cuts short) after printing 3 tokens,
# and creates the file named by its first argument once it is paused, so the test knows when to type Ctrl-C.
PAUSE_AFTER_3_TOKENS = """
import pathlib, runpy, sys, time
import model.gpt as gpt
paused, real, calls = pathlib.Path(sys.argv[1]), gpt.sample_next, [0]
def sample_next(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 4:
        paused.touch()
        time.sleep(120)
    return real(*args, **kwargs)
gpt.sample_next = sample_next  # chat.py imports it from model.gpt when it starts
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_stops_a_reply_and_leaves_at_the_prompt_and_a_double_slash_sends(sft_run, tmp_path):
    """Ctrl-C typed while the first reply is being generated (3 tokens printed) stops it and returns to the prompt;
    the message and its partial reply are dropped, so the next reply is greedy generation on the next message alone.
    "/sort" is refused as an unknown command that says how to send it; "//Sort: 9 4 7" sends "/Sort: 9 4 7".
    Ctrl-C at the prompt leaves, exit status 130."""
    run = load_run(sft_run, "cpu", "fp32")
    u1, u2 = "Sort: 9 4 7", "/Sort: 9 4 7"
    ids = chat.render_prompt([{"role": "user", "content": u1}], run.tok)
    first = []
    with torch.no_grad():
        while len(first) < 4:  # greedy: the first reply's first 4 tokens, none of them <|end|>
            first.append(run.model(torch.tensor([ids + first]))[0, -1].argmax().item())
    assert END_ID not in first
    partial = run.tok.decode(first[:3])
    a2 = greedy_reply(run, [{"role": "user", "content": u2}], MAX_NEW)
    kept_partial = [{"role": "user", "content": u1}, {"role": "assistant", "content": partial},
                    {"role": "user", "content": u2}]
    assert a2 != greedy_reply(run, kept_partial, MAX_NEW)  # keeping the partial exchange would change the answer

    paused = tmp_path / "paused"
    term = Terminal(sft_run, "--temperature", 0, "--max-new-tokens", MAX_NEW, "--device", "cpu",
                    code=PAUSE_AFTER_3_TOKENS, wrapper_args=[paused])
    term.read_until_prompt()
    os.write(term.fd, u1.encode() + b"\n")
    assert term.read_until(f"{u1}\n{partial}") == f"{u1}\n{partial}"
    deadline = time.monotonic() + 60
    while not paused.exists():
        assert time.monotonic() < deadline, "the reply never paused"
        time.sleep(0.01)
    os.write(term.fd, b"\x03")  # Ctrl-C
    assert term.read_until_prompt() == ("^C\n[reply stopped: this message and its partial reply are not kept in the "
                                        "conversation]\n> ")
    term.send("/sort", "/sort\n[unknown command '/sort'; commands: /reset (forget the conversation), /quit (leave "
                       "(Ctrl-D too)). To send a message starting with \"/\", double the slash: '//sort' sends "
                       "'/sort']\n> ")
    term.send("/" + u2, exchange("/" + u2, a2))
    # Typed the instant "> " shows, Ctrl-C can land between input()'s prompt and its read(), where CPython notes the
    # signal but stays blocked in the read; a person types later than that, and so does this test.
    time.sleep(0.5)
    assert term.close(b"\x03") == 130


def test_an_imported_chat_model_is_served_with_a_notice(sft_run, tmp_path):
    """scripts/import_hf.py of the SFT run's export records stage "pretrain" (an import knows no stage): chat.py
    serves it, saying so, and its first greedy reply is the SFT run's own (the weights made the round trip)."""
    optional_import("transformers")
    export_hf, import_hf = load_script("export_hf"), load_script("import_hf")
    export_hf.main([str(sft_run), str(tmp_path / "export")])
    imported = import_hf.main([str(tmp_path / "export"), str(tmp_path / "imported")])
    run = load_run(imported, "cpu", "fp32")
    assert run.cfg.stage == "pretrain" and run.ckpt["imported_from"] == str((tmp_path / "export").resolve())
    u1 = "Sort: 9 4 7"
    (a1,) = sample_cli.main([str(sft_run), "--chat", "--prompt", u1, "--temperature", "0", "--max-new-tokens",
                             str(MAX_NEW), "--device", "cpu"])
    term = Terminal(imported, "--temperature", 0, "--max-new-tokens", MAX_NEW, "--device", "cpu")
    banner = term.read_until_prompt()
    assert banner.startswith(f"[{run.ckpt['path']} was imported from {run.ckpt['imported_from']}, and an import "
                             "records no training stage: it is served in the chat format its tokenizer holds.")
    term.send(u1, exchange(u1, a1))
    assert term.close(b"/quit\n") == 0


def test_the_default_reply_length_is_sample_pys_where_it_fits():
    """128 tokens (sample.py's default) from a 256-token context up; half the context below, so a message fits."""
    assert [chat_cli.reply_budget(None, block) for block in (64, 200, 256, 1024, 2048)] == [32, 100, 128, 128, 128]
    assert chat_cli.reply_budget(300, 1024) == 300
