"""What each stage feeds the loop: the tokenizer, train batches, validation, samples and the objective.

The three stage classes have the same small surface (a little duplication beats a framework):
    train                      the resumable batcher (state_dict / load_state_dict)
    train_batch() -> dict      the next micro-batch on the device
    batch_tokens(batch) -> int tokens processed (for tokens/s)
    make_objective(reference, autocast, precision)   training/objectives.py (only DPO uses the arguments)
    validate(model, autocast, info) -> dict    held-out figures (every rank takes part)
    sample(model, autocast) -> str             a generated sample
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from filelock import FileLock

from data import chat, shards
from data.preference import PreferenceBatcher, load_preferences
from data.sft import SFTBatcher, load_records, load_sft, record_to_messages
from data.sources import describe_source, load_source
from data.tokenizer import END_ID, Tokenizer, train_tokenizer
from model.gpt import GPT, PRESETS, GPTConfig
from model.losses import IGNORE
from training import checkpoint
from training.config import Config
from training.distributed import DistInfo, barrier
from training.evaluation import chat_accuracy, lm_figures, preference_figures
from training.monitor import print0
from training.objectives import DPO, LanguageModeling


def cache_root(cfg: Config) -> Path:
    root = cfg.data.cache_dir or os.environ.get("GPTRAIN_CACHE") or Path.home() / ".cache" / "gptrain"
    return Path(root).expanduser()


def _to(batch: dict, device: torch.device) -> dict:
    # Pinned host memory + non_blocking lets the copy overlap the previous step's GPU work.
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


def resolve_tokenizer(cfg: Config, info: DistInfo, ckpt: dict | None) -> Tokenizer:
    """The run's tokenizer: the checkpoint's (resume / --init-from), a given tokenizer.json, or one trained on the
    training split of the source and cached (trained once even when several processes start together)."""
    if ckpt is not None:
        import tokenizers

        return Tokenizer(tokenizers.Tokenizer.from_str(ckpt["tokenizer"]), source=ckpt.get("path", "checkpoint"))
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    if cfg.stage != "pretrain":
        raise ValueError(f"--stage {cfg.stage} needs --init-from (the tokenizer comes from the starting run)")
    vocab = cfg.model.vocab_size or PRESETS[cfg.model.preset]["vocab_size"]
    src = describe_source(cfg.data.source, "train")  # FileNotFoundError for a missing path, nothing written
    key = hashlib.sha256(f"{src.fingerprint}|{cfg.data.text_column}|{vocab}|{cfg.data.tokenizer_max_mb}|v1"
                         .encode()).hexdigest()[:16]
    path = cache_root(cfg) / "tokenizers" / f"{vocab}-{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            print0(f"tokenizer: reusing {path}")
            return Tokenizer.load(path)
        t0 = time.perf_counter()
        ds = load_source(cfg.data.source, "train", cfg.data.text_column)
        # A deterministic sample of whole documents, up to tokenizer_max_mb of text.
        budget = int(cfg.data.tokenizer_max_mb * 1e6)
        order = ds.shuffle(seed=0)
        texts, used = [], 0
        for text in order["text"]:
            texts.append(text)
            used += len(text.encode("utf-8"))
            if used >= budget:
                break
        tok = train_tokenizer(texts, vocab_size=vocab)
        tok.save(path)
        print0(f"tokenizer: trained byte-level BPE, vocab {tok.vocab_size}, on {used / 1e6:.1f} MB in "
               f"{time.perf_counter() - t0:.1f}s -> {path}")
        return tok


# ----------------------------------------------------------------------------------------------- pre-training
class PretrainData:
    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        self.cfg, self.tok, self.info, self.device = cfg, tok, info, info.device
        self.block_size = gcfg.block_size
        shard_dir = shards.default_shard_dir(cache_root(cfg) / "shards", cfg.data.source, tok)
        num_proc = cfg.data.num_proc or None
        self.manifests = {
            split: shards.prepare(cfg.data.source, tok, shard_dir, split, cfg.data.text_column, num_proc=num_proc,
                                  block_size=gcfg.block_size, verbose=info.is_main)
            for split in ("train", "val")
        }
        self.train_path = shards.shard_paths(shard_dir, "train")[0]
        self.val_path = shards.shard_paths(shard_dir, "val")[0]
        self.train = shards.TokenLoader(self.train_path, cfg.train.batch_size, gcfg.block_size, seed=cfg.train.seed,
                                        rank=info.rank, world_size=info.world_size)
        self.byte_lengths = torch.as_tensor(tok.token_byte_lengths(), device=self.device).long()
        self.tokens_per_micro_batch = cfg.train.batch_size * gcfg.block_size
        self.last_val_seconds = 0.0
        m = self.manifests["train"]
        print0(f"data: {cfg.data.source}: train {m['tokens']:,} tokens ({m['bytes'] / 1e6:.1f} MB), val "
               f"{self.manifests['val']['tokens']:,} tokens; {self.train.steps_per_epoch} steps per epoch")

    def train_batch(self) -> dict:
        x, y = self.train.next_batch()
        return _to({"input_ids": x, "labels": y}, self.device)

    def batch_tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def make_objective(self, reference=None, autocast=None, precision=None):
        return LanguageModeling()

    def val_batches(self, max_tokens: int | None):
        """This rank's validation batches (rank r scores blocks r, r + world_size, ...). Every rank yields the same
        number of batches -- a forward under FSDP is a collective -- so a rank whose share runs out first adds a
        stand-in batch whose targets are all ignored (it counts for nothing)."""
        B, T, W = self.cfg.train.batch_size, self.block_size, self.info.world_size
        n_blocks = (self.manifests["val"]["tokens"] - 1) // T  # the grid of shards.eval_batches
        if max_tokens is not None:
            n_blocks = min(n_blocks, max(1, max_tokens // T))
        most = -(-n_blocks // W)  # rank 0 holds the most blocks: ceil(n_blocks / W)
        n_batches = -(-most // B)
        done = 0
        for x, y in shards.eval_batches(self.val_path, B, T, max_tokens=max_tokens, rank=self.info.rank,
                                        world_size=W, device=self.device):
            done += 1
            yield x, y
        assert done <= n_batches, (done, n_batches)
        for _ in range(n_batches - done):
            yield (torch.zeros(1, T, dtype=torch.long, device=self.device),
                   torch.full((1, T), IGNORE, dtype=torch.long, device=self.device))

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        """Loss and bits per byte on the first eval.max_tokens of the validation split (all of it when full)."""
        t0 = time.perf_counter()
        max_tokens = None if full else self.cfg.eval.max_tokens or None
        figures = lm_figures(model, self.val_batches(max_tokens), self.byte_lengths, autocast)
        self.last_val_seconds = time.perf_counter() - t0
        return figures

    def sample(self, model, autocast) -> str:
        e = self.cfg.eval
        idx = torch.tensor([self.tok.encode(e.sample_prompt)], device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        with autocast:
            out = generate(model, idx, e.sample_tokens, e.temperature, e.top_k, None, (), g)
        return self.tok.decode(out[0].tolist())


def generate(model, idx, max_new, temperature, top_k, top_p, stop, generator):
    was_training = model.training
    model.eval()
    try:
        return GPT.generate(model, idx, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=stop, generator=generator)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- SFT
def _chat_eval_items(cfg: Config, kind: str, limit: int, tok: Tokenizer, block_size: int,
                     kept: list[int]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) pairs from the validation split: the last assistant turn is the answer.

    Only records whose example survived the length filter (``kept``: the record indices load_sft/load_preferences
    returned) and whose rendered prompt leaves room to generate (fewer than block_size tokens; generate() would keep
    only the last block_size // 2 tokens of a longer one) are used: a prompt dropped for length must not come back,
    truncated, among the scored and sampled prompts."""
    records, label = load_records(cfg.data.source, "validation", kind, cfg.train.seed, cfg.data.synthetic_val)
    kept_records = set(kept)
    items, n_too_long = [], 0
    for i, rec in records:
        if len(items) == limit:
            break
        if i not in kept_records:
            continue
        where = f"record {i} of {label}"
        if kind == "sft":
            messages = record_to_messages(rec, where)
        else:
            from data.preference import record_to_pair

            prompt, chosen, _ = record_to_pair(rec, where)
            messages = prompt + chosen
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        if len(chat.render_prompt(messages[:last], tok)) >= block_size:
            n_too_long += 1
            continue
        items.append((messages[:last], messages[last]["content"]))
    if not items:
        raise ValueError(f"no validation prompt of {label} fits in block_size={block_size} tokens with room to "
                         "generate a reply; accuracy and samples need at least one")
    if n_too_long:
        print0(f"data: {n_too_long} validation prompts not scored: {block_size} tokens or longer")
    return items


class SFTData:
    accuracy_examples = 100  # validation prompts answered greedily for the accuracy figure

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        self.cfg, self.tok, self.info, self.device = cfg, tok, info, info.device
        T = gcfg.block_size
        n_train, n_val = cfg.data.synthetic_train, cfg.data.synthetic_val
        train, st = load_sft(cfg.data.source, "train", tok, T, seed=cfg.train.seed, n_synthetic=n_train)
        val, sv = load_sft(cfg.data.source, "validation", tok, T, seed=cfg.train.seed, n_synthetic=n_val)
        for s in (st, sv):
            print0(f"data: {s['source']}: {s['n_examples']} examples ({s['n_dropped']} dropped: no supervised token "
                   f"left after truncation to {T}), {s['n_supervised']:,} supervised tokens")
        self.n_dropped = st["n_dropped"]
        self.train = SFTBatcher(train, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                                world_size=info.world_size, pack=cfg.data.pack, block_size=T)
        self.val_examples = val
        self.tokens_per_micro_batch = cfg.train.batch_size * T
        self.eval_items = _chat_eval_items(cfg, "sft", self.accuracy_examples, tok, T, sv["kept"])
        self.last_val_seconds = 0.0

    def train_batch(self) -> dict:
        return _to(self.train.next_batch(), self.device)

    def batch_tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def make_objective(self, reference=None, autocast=None, precision=None):
        return LanguageModeling()

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        figures = lm_figures(model, self.val_batches(info), None, autocast)
        figures["accuracy"] = chat_accuracy(model, self.tok, self.eval_items, autocast, self.device)
        self.last_val_seconds = time.perf_counter() - t0
        return figures

    def val_batches(self, info: DistInfo):
        """(input_ids, labels) of every validation example exactly once, this rank's share (see eval_shares)."""
        for idx in eval_shares(len(self.val_examples), self.cfg.train.batch_size, info.rank, info.world_size):
            rows = [self.val_examples[i] for i in idx] or self.val_examples[:1]
            b = _to(SFTBatcher(rows, len(rows), shuffle=False).next_batch(), self.device)
            if not idx:  # an idle rank's stand-in row: its forward runs, none of its tokens count
                b["labels"].fill_(IGNORE)
            yield b["input_ids"], b["labels"]

    def sample(self, model, autocast) -> str:
        return chat_sample(model, self.tok, self.eval_items, autocast, self.device)


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


# ----------------------------------------------------------------------------------------------- DPO
class DPOData:
    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        self.cfg, self.tok, self.info, self.device = cfg, tok, info, info.device
        T = gcfg.block_size
        train, st = load_preferences(cfg.data.source, "train", tok, T, seed=cfg.train.seed,
                                     n_synthetic=cfg.data.synthetic_train)
        val, sv = load_preferences(cfg.data.source, "validation", tok, T, seed=cfg.train.seed,
                                   n_synthetic=cfg.data.synthetic_val)
        for s in (st, sv):
            print0(f"data: {s['source']}: {s['n_examples']} pairs ({s['n_dropped']} dropped by truncation to {T})")
        self.train_examples, self.val_examples = train, val
        self.train = PreferenceBatcher(train, cfg.train.batch_size, seed=cfg.train.seed, rank=info.rank,
                                       world_size=info.world_size)
        self.tokens_per_micro_batch = 2 * cfg.train.batch_size * T
        # Held-out prompts answered greedily: does preference training help (or hurt) the actual task?
        self.eval_items = _chat_eval_items(cfg, "dpo", SFTData.accuracy_examples, tok, T, sv["kept"])
        self.objective = None
        self.last_val_seconds = 0.0

    def train_batch(self) -> dict:
        return _to(self.train.next_batch(), self.device)

    def batch_tokens(self, batch: dict) -> int:
        return batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel()

    def _all_batches(self, examples, world_size: int, rank: int) -> list[dict]:
        """Every pair exactly once, this rank's share (see eval_shares); `index` is the pair's position in
        `examples` (the key of cached reference log-probs), `valid` is False on an idle rank's stand-in pair."""
        batches = []
        for idx in eval_shares(len(examples), self.cfg.train.batch_size, rank, world_size):
            rows = [examples[i] for i in idx] or examples[:1]
            b = PreferenceBatcher(rows, len(rows), shuffle=False).next_batch()
            b["index"] = torch.tensor(idx or [0], dtype=torch.long)
            b["valid"] = torch.full((len(rows),), bool(idx))
            batches.append(_to(b, self.device))
        return batches

    def make_objective(self, reference, autocast=None, precision: str = "fp32"):
        """The DPO objective with a live reference, or (dpo.ref_cache) with its log-probs of every pair, computed once
        by the reference as the loop wraps it, under the loop's autocast: the policy's numeric path. `precision` is
        the run's (fp32 / bf16 / fp16); it is part of the cache's key."""
        d = self.cfg.dpo
        if not d.ref_cache:
            self.objective = DPO(d.beta, d.loss_type, d.label_smoothing, reference=reference)
            return self.objective
        path = Path(self.cfg.out) / "ref_logps.pt"
        key = self._ref_cache_key(reference, precision)
        cache = self._read_ref_cache(path, key)
        if cache is None:
            cache = self._compute_ref_cache(reference, autocast or nullcontext(), key)
            if self.info.is_main:
                Path(self.cfg.out).mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                torch.save(cache, buf)
                checkpoint.atomic_write_bytes(path, buf.getvalue())  # temporary file, fsync, rename
            barrier()
            print0(f"dpo: cached reference log-probs of {len(self.train_examples)} + {len(self.val_examples)} pairs "
                   f"in {path}")
        self.objective = DPO(d.beta, d.loss_type, d.label_smoothing,
                             ref_cache={"train": cache["train"], "validation": cache["validation"]})
        return self.objective

    def _ref_cache_key(self, reference, precision: str) -> dict:
        """What the cached values depend on: the reference's weights (a checksum), the pairs, sums vs IPO's means,
        and the numeric path (the precision, and FSDP's mixed precision instead of autocast)."""
        # Under FSDP every rank gathers each sharded weight in the same order (a collective per parameter).
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in reference.parameters()]
        return {"init_from": self.cfg.init_from, "weights": float(sum(p.detach().double().sum() for p in full)),
                "loss_type_mean": self.cfg.dpo.loss_type == "ipo",
                "data": (self.cfg.data.source, self.cfg.train.seed),
                "n": (len(self.train_examples), len(self.val_examples)), "precision": precision,
                "fsdp": self.cfg.dist.strategy == "fsdp" and self.info.distributed}

    def _read_ref_cache(self, path: Path, key: dict) -> dict | None:
        """The cache at path if it is readable, well-formed and was computed for `key`; else None (recompute). Read
        with the restricted unpickler: tensors, containers, strings and numbers only, no code runs."""
        if not path.exists():
            return None
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or a pickle that would run code: recomputed, never fatal
            print0(f"dpo: {path} is not a readable reference cache ({type(e).__name__}: {str(e)[:200]}); "
                   "recomputing it")
            return None
        sizes = {"train": len(self.train_examples), "validation": len(self.val_examples)}
        if not (isinstance(cache, dict) and all(isinstance(cache.get(s), torch.Tensor) and
                                                tuple(cache[s].shape) == (n, 2) for s, n in sizes.items())):
            print0(f"dpo: {path} does not hold [chosen, rejected] log-probs of {sizes} pairs; recomputing it")
            return None
        if cache.get("key") != key:
            print0(f"dpo: {path} was computed for another reference, data or precision; recomputing it")
            return None
        return cache

    def _compute_ref_cache(self, reference, autocast, key: dict) -> dict:
        """Reference log-probs of every pair, [chosen, rejected] fp32 rows by pair index, computed as the loop's
        live reference would compute them. Every rank runs every batch (under FSDP each forward is a collective)."""
        d = self.cfg.dpo
        probe = DPO(d.beta, d.loss_type, d.label_smoothing, reference=reference)
        cache = {"key": key}
        for split, examples in (("train", self.train_examples), ("validation", self.val_examples)):
            rows = torch.zeros(len(examples), 2)
            for batch in self._all_batches(examples, 1, 0):
                with autocast:
                    rc, rr = probe.reference_logps(batch)
                rows[batch["index"].cpu()] = torch.stack([rc, rr], dim=1).float().cpu()
            cache[split] = rows
        return cache

    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        batches = self._all_batches(self.val_examples, info.world_size, info.rank)
        figures = preference_figures(model, self.objective, batches, autocast, split="validation")
        figures["accuracy"] = chat_accuracy(model, self.tok, self.eval_items, autocast, self.device)
        self.last_val_seconds = time.perf_counter() - t0
        return figures

    def sample(self, model, autocast) -> str:
        return chat_sample(model, self.tok, self.eval_items, autocast, self.device)


STAGE_DATA = {"pretrain": PretrainData, "sft": SFTData, "dpo": DPOData}


def build_stage_data(cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo):
    return STAGE_DATA[cfg.stage](cfg, tok, gcfg, info)

