"""The stage interface (what training/loop.py asks of a stage) and the helpers the stages share.

A stage is one module in training/stages/ holding one Stage subclass, and one line in STAGES
(training/stages/__init__.py). The loop calls, in this order:

    Stage.check_launch(cfg, launch)              first: refuse a launch the stage cannot serve (pre-training under a
                                                 multi-node torchrun: a source that is not prepared)
    Stage.prepare(cfg, tok, gcfg, launch)        before any process group exists (no collective, no timeout): data
                                                 the stage reads from disk made ready (pre-training: token shards;
                                                 the processes of one machine serialise on a file lock)
    stage = Stage(cfg, tok, gcfg, info)          data built from the config (parsing lives in data/)
    stage.setup_frozen(policy, env)              once, before the policy is wrapped: the frozen models the stage
                                                 holds beside the policy (DPO: the reference; RL: a reference, a
                                                 reward model), wrapped with env.wrap onto the policy's numeric path
    stage.identity() -> {name: hash}             what every rank must agree on (checked across ranks before training)
    stage.load_state_dict(d) / state_dict()      the loader state a checkpoint holds for exact resume (a stage that
                                                 reuses generated batches keeps them and their use count here);
    stage.before_save()                          on every rank before rank 0 calls state_dict (RL gathers every
                                                 rank's generated batch there: rank 0 writes the checkpoint)
    per step, after torch is seeded for the step:
      batches = stage.train_batches(policy, n)   the step's n micro-batches, given the policy (a stage may generate
                                                 them with it here: no gradients, plain module or FSDP's; under
                                                 FSDP every forward is a collective, so every rank must run the
                                                 same number of them: GPT.generate stops early once all its rows
                                                 hit a stop token, so generate a fixed length there)
      stage.objective.count(batch) -> Tensor     normalisation units of a batch, known once the batch exists; the
                                                 loop sums them over micro-batches and ranks and divides once
      stage.objective(model, batch)              -> (loss sum, {metric name: sum}) under autocast, with gradients
      stage.batch_tokens(batch) -> int           tokens processed (tokens/s, tokens_seen)
    stage.step_logs() -> {name: float}         figures of the step's batches that are not per-unit sums (RL: the
                                                 generation's rewards), already global; logged as train/NAME
      stage.step_flops(model, batches) -> int    model FLOPs of the step on this rank (train/mfu)
    stage.validate(model, autocast, info, full)  held-out figures, logged as val/NAME (every rank takes part)
    stage.sample(model, autocast) -> str         a generated sample

Class attributes answer questions asked without an instance (scripts/evaluate.py, the tokenizer, the console):
model_class, new_weights, trains_tokenizer, fine_tunes, eval_kinds, synthetic_records, chat, console_metrics, tokens_per_micro_batch (set in __init__).
No registry and no deeper hierarchy: a new stage subclasses Stage and overrides what differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from data import chat
from data.preference import prompt_and_reference
from data.sft import load_records
from data.tokenizer import END_ID, Tokenizer
from model.gpt import GPT
from training import checkpoint
from training.config import Config
from training.distributed import DistInfo
from training.monitor import print0, step_flops
from training.tokenizer_cache import hf_cache_dir
from training.weights import load_weights


@dataclass
class StageEnv:
    """What a stage needs to build its frozen models (Stage.setup_frozen)."""

    start_checkpoint: str | None  # the exact checkpoint file the run started from (None for a fresh pre-training)
    resumed: bool  # the policy holds a resumed run's trained weights, not the starting ones
    wrap: Callable[[torch.nn.Module], torch.nn.Module]  # a frozen model onto the policy's numeric path (FSDP, dtype)
    autocast: object  # the loop's autocast context
    precision: str  # fp32 | bf16 | fp16


class Stage:
    """The interface between the loop and a stage (module docstring); defaults for a stage with a plain batcher
    in `self.train` (next_batch, state_dict, load_state_dict)."""

    model_class = GPT  # the network the stage trains (the reward model: model/reward.py:RewardModel)
    new_weights: tuple[str, ...] = ()  # its weights a starting run may lack (they keep their fresh initialisation)
    trains_tokenizer = False  # may train a fresh tokenizer (else it comes from --init-from)
    fine_tunes = True  # starts from a checkpoint: --init-from is required (training/config.py:validate)
    eval_kinds: tuple[str, ...] = ("chat",)  # what scripts/evaluate.py measures on the run's own data
    synthetic_records = "sft"  # which records `--data synthetic` gives evaluate.py for this stage: sft | dpo
    chat = True  # samples answer a prompt as a chat turn
    console_metrics: tuple[str, ...] = ()  # metric sums printed on the console line (all are logged)
    # config keys this stage sets before the TOML file and the flags (anything can still be overridden)
    defaults: dict[str, object] = {}

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg, info: DistInfo) -> None:
        self.cfg, self.tok, self.info, self.device = cfg, tok, info, info.device
        self.tokens_per_micro_batch = 0
        self.objective = None
        self.train = None

    @classmethod
    def check_launch(cls, cfg: Config, launch: DistInfo) -> None:
        """Refuse a launch this stage cannot serve (before anything is read or written); any by default."""

    @classmethod
    def prepare(cls, cfg: Config, tok: Tokenizer, gcfg, launch: DistInfo) -> None:
        """Make the stage's data ready on disk before the process group starts; nothing by default (records are
        read in __init__). `launch` is the torchrun layout read from the environment."""

    def identity(self) -> dict[str, str]:
        """Hashes of what this rank trains on, which every rank must share; the tokenizer's is checked by the loop."""
        return {}

    def setup_frozen(self, policy: GPT, env: StageEnv) -> None:
        """Build the frozen models this stage holds beside the policy; none by default."""

    def train_batch(self) -> dict:
        return to_device(self.train.next_batch(), self.device)

    def train_batches(self, policy, n: int) -> list[dict]:
        """The step's n micro-batches; `policy` is for stages that generate their batches."""
        return [self.train_batch() for _ in range(n)]

    def batch_tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def step_flops(self, model: GPT, batches: list[dict]) -> int:
        return step_flops(model, batches)

    def step_logs(self) -> dict[str, float]:
        """Figures of the last step's batches logged as they are (none by default: metrics are per-unit sums)."""
        return {}

    def before_save(self) -> None:
        """Called on every rank before rank 0 asks for state_dict (a collective may run here); nothing by default."""

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, model, autocast) -> str:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- shared helpers
def to_device(batch: dict, device: torch.device) -> dict:
    # Pinned host memory + non_blocking lets the copy overlap the previous step's GPU work.
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


def frozen_reference(policy: GPT, env: StageEnv, stage: str, init_from: str) -> GPT:
    """A frozen copy of the run's starting weights (eval mode, no gradients), not yet wrapped: a copy of the policy
    before training, or, on --resume (the policy holds trained weights), read from the starting checkpoint. At step
    0 with dropout 0, on the policy's numeric path, its log-probs equal the policy's exactly."""
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if env.resumed:
        start = env.start_checkpoint
        if not start or not Path(start).is_file():
            raise ValueError(f"--resume of a {stage} run needs its reference, the starting checkpoint "
                             f"{start or init_from!r}, which is gone")
        load_weights(reference, checkpoint.load(start)["model"])
    return reference


def generate(model, idx, max_new, temperature, top_k, top_p, stop, generator):
    was_training = model.training
    model.eval()
    try:
        return GPT.generate(model, idx, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=stop, generator=generator)
    finally:
        model.train(was_training)


def chat_eval_items(cfg: Config, kind: str, limit: int, tok: Tokenizer, block_size: int,
                     kept: list[int]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) pairs from the validation split: the last assistant turn is the answer.

    Only records whose example survived the length filter (``kept``: the record indices load_sft/load_preferences
    returned) and whose rendered prompt leaves room to generate (fewer than block_size tokens; generate() would keep
    only the last block_size // 2 tokens of a longer one) are used: a prompt dropped for length must not come back,
    truncated, among the scored and sampled prompts."""
    records, label = load_records(cfg.data.source, "val", kind, cfg.train.seed, cfg.data.synthetic_val,
                                  hf_cache_dir(cfg))
    kept_records = set(kept)
    items, n_too_long = [], 0
    for i, rec in records:
        if len(items) == limit:
            break
        if i not in kept_records:
            continue
        prompt, reference = prompt_and_reference(rec, f"record {i} of {label}")
        if len(chat.render_prompt(prompt, tok)) >= block_size:
            n_too_long += 1
            continue
        items.append((prompt, reference))
    if not items:
        raise ValueError(f"no validation prompt of {label} fits in block_size={block_size} tokens with room to "
                         "generate a reply; accuracy and samples need at least one")
    if n_too_long:
        print0(f"data: {n_too_long} validation prompts not scored: {block_size} tokens or longer")
    return items


def eval_shares(n: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Indices of n held-out examples in validation batches for one rank: global batches of batch_size *
    world_size consecutive examples, rank r taking rows [r*B, (r+1)*B). Every example is scored exactly once
    (no wrap-around), and every rank gets the same number of batches -- a forward under FSDP is a collective, so
    a rank whose share of the last batch is empty gets [] and runs a stand-in row that counts for nothing."""
    step = batch_size * world_size
    return [list(range(min(s + rank * batch_size, n), min(s + (rank + 1) * batch_size, n)))
            for s in range(0, n, step)]


def chat_sample(model, tok: Tokenizer, items, autocast, device) -> str:
    messages, reference = items[0]
    idx = torch.tensor([chat.render_prompt(messages, tok)], device=device)
    with autocast:
        out = generate(model, idx, 64, 0.0, None, None, (END_ID,), None)
    reply = chat.decode_reply(out[0, idx.shape[1]:].tolist(), tok)
    return f"{messages[-1]['content']}\n-> {reply!r} (reference {reference!r})"
