"""RL: online reinforcement learning with group-relative advantages and a KL penalty to the starting model.

Each generation: train.grad_accum x train.batch_size prompts per rank (the global prompts of a generation are drawn
from one seeded stream that every rank replays; rank r takes its slice, so groups never span ranks), each sampled
rl.num_generations times from the current policy (model/generation.py: one left-padded batch per micro-batch, the
KV cache, a random state from (seed, generation, global prompt index, completion index): the same completions on
any number of ranks). The completions are rewarded (training/rewards.py), their advantages are group-relative
(model/losses.py:group_advantages); with rl.filter_groups the groups whose rewards are all equal (advantage 0)
are left out (informative_groups), and the frozen reference's log-probs of the sampled tokens are computed once.
The batch is then trained on for rl.updates_per_batch optimizer steps (train.max_steps counts these).

Objective per completion token (model/losses.py), summed, and divided by the loop once by the step's completion
tokens over all micro-batches and ranks:
    clipped_surrogate(logps, old_logps, A, clip_eps) + beta * kl_estimate(logps, ref_logps)
old_logps are the policy's own log-probs, detached, at the batch's first update (the weights that generated it):
the ratio is then exactly 1. All log-probs (old, new, reference) come from the logits divided by rl.temperature,
the distribution the tokens were sampled from. The reference is a frozen copy of the starting weights on the
policy's numeric path, so at step 0 the KL is exactly 0.

Logged (TRL's GRPO names): loss, kl, entropy, clip_ratio/{low,high,region}_mean per token; reward, reward_std (the
mean of the groups' standard deviations), rewards/NAME/mean, completions/{mean_length,clipped_ratio},
frac_reward_zero_std per generation. Validation: greedy completions of the held-out prompts: accuracy (exact match,
per task where records name one) and reward. Sample: a group's prompt, completions and rewards.
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.nn.functional as F

from data import chat
from data.rl import RLPrompt, load_rl_prompts
from data.sft import ExampleStream
from data.synthetic import answer_matches
from data.tokenizer import END_ID, PAD_ID, Tokenizer
from model.generation import generate_rollouts, hashed_key
from model.gpt import GPT, GPTConfig
from model.losses import clipped_surrogate, group_advantages, kl_estimate
from training.config import Config
from training.distributed import DistInfo, all_reduce, gather_objects
from training.monitor import print0
from training.rewards import (
    BUILTIN,
    RewardModelEnsemble,
    Rollouts,
    builtin_reward,
    call_reward,
    completion_text,
    display_name,
    import_reward,
    reward_names,
    reward_weights,
)
from training.stages.base import Stage, StageEnv, eval_shares, frozen_reference
from training.tokenizer_cache import hf_cache_dir

# A group whose rewards' sample std is below this counts as all-equal (frac_reward_zero_std, rl.filter_groups).
ZERO_STD = 1e-6


def row_key(seed: int, generation: int, prompt_index: int, completion: int) -> int:
    """The sampling key (int64) of one completion: a hash of (seed, generation, global prompt index, completion)."""
    return hashed_key("gptrain-rl", seed, generation, prompt_index, completion)


def completion_logps(model, batch: dict, temperature: float, entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, M) fp32 of the completion tokens under model's logits / temperature, and (entropy=True) the
    per-token entropy (N, M) of that distribution, detached. batch: input_ids, positions, pad_mask (N, P + M)."""
    logits = model(batch["input_ids"], positions=batch["positions"], pad_mask=batch["pad_mask"])  # (N, P + M, V)
    p = batch["prompt_len"]
    scaled = logits[:, p - 1 : -1].float() / temperature  # (N, M, V): position t predicts token t + 1
    logp_all = F.log_softmax(scaled, dim=-1)
    logps = logp_all.gather(-1, batch["input_ids"][:, p:, None]).squeeze(-1)  # (N, M)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)  # (N, M)
    return logps, ent


def informative_groups(batch: dict, group_std: torch.Tensor, group_size: int) -> dict:
    """The rows of the groups whose rewards are not all equal (rl.filter_groups): a group of equal rewards has
    advantage 0 on every completion, so in the update it carries only the KL term, and it costs a reference forward
    and a policy forward and backward. Leaving it out is DAPO's dynamic sampling without the re-sampling (Yu et al.
    2025): the loss is then normalised by the kept groups' completion tokens.

    batch: a micro-batch whose tensors have B x G rows; group_std (B,). A micro-batch with no such group keeps its
    first group with its completion mask cleared: a forward (a collective under FSDP) and a gradient (which DDP
    waits for) that add exactly 0 to the loss, the figures and the token count, so the step equals the one over the
    informative groups alone on any number of ranks."""
    informative = group_std >= ZERO_STD  # (B,)
    placeholder = not bool(informative.any())
    if placeholder:
        informative = torch.zeros_like(informative)
        informative[0] = True
    rows = informative.repeat_interleave(group_size)  # (B x G,)
    kept = {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows.shape[0] else v
            for k, v in batch.items()}
    if placeholder:
        kept["completion_mask"] = torch.zeros_like(kept["completion_mask"])
    return kept


class GroupPolicyOptimization:
    """The clipped surrogate plus beta x the KL estimate, per completion token (module docstring)."""

    unit = "completion tokens"

    def __init__(self, beta: float, clip_eps: float, temperature: float) -> None:
        self.beta, self.clip_eps, self.temperature = beta, clip_eps, temperature

    def count(self, batch: dict) -> torch.Tensor:
        return batch["completion_mask"].sum()

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, entropy = completion_logps(model, batch, self.temperature, entropy=True)
        if "old_logps" not in batch:  # the batch's first update: these weights generated it (ratio exactly 1)
            batch["old_logps"] = logps.detach()
        keep = batch["completion_mask"]  # (N, M)
        # Padding after a row's end is masked out of the loss; its ratio and KL are pinned to 1 and 0 first, so that
        # an exp() overflowing there cannot turn into inf * 0 = NaN.
        old = torch.where(keep, batch["old_logps"], logps.detach())
        ref = torch.where(keep, batch["ref_logps"], logps.detach())
        surrogate, low, high = clipped_surrogate(logps, old, batch["advantages"], self.clip_eps)
        kl = kl_estimate(logps, ref)  # (N, M)
        mask = keep.float()  # (N, M)
        loss_sum = ((surrogate + self.beta * kl) * mask).sum()
        metrics = {"kl": (kl.detach() * mask).sum(), "entropy": (entropy * mask).sum(),
                   "clip_ratio/low_mean": (low * mask).sum(), "clip_ratio/high_mean": (high * mask).sum(),
                   "clip_ratio/region_mean": ((low | high) * mask).sum()}
        return loss_sum, metrics


def device_clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done: CUDA kernels run asynchronously, so without the
    sync a part's kernels would be timed in whichever later part first waits for them (scripts/bench.py --rl)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class RLStage(Stage):
    """Online RL: sample groups of completions, reward them, train on group-relative advantages with a KL penalty."""

    console_metrics = ("reward", "kl")
    # From the default SFT run, greedy exact match on its 400 held-out prompts (0.3875 before RL), measured on 2 CPU
    # cores: lr 2e-4 x 200 steps, 8 prompts x 8 completions 0.3875; lr 1e-3 x 400 0.4025 (KL up to 1.1); 16 x 8 at
    # lr 3e-4 x 300 0.4075, at temperature 0.7 0.405, lr 5e-4 0.4125, 2 updates per batch with beta 0 0.3825;
    # 8 x 16 at lr 5e-4 x 300 0.415, x 600 0.42 (4:11); that with advantages only centred (scale_rewards=none, lr
    # 1e-3) 0.3925, at temperature 1.2 0.3975. Most groups have all-equal rewards (reverse is always right, add
    # almost never): ~70% of the groups give no signal. More prompts with fewer completions each, at the same 128
    # rows per step (seeds 1337 / 2): 8 x 16 x 600 steps 0.4125 / 0.4150 (4:21); 32 x 4 x 600 0.4475 / 0.4175, but
    # its steps cost 523 ms against 413 (more distinct prompts to pad and decode), 5:14 in all, over the stage's
    # 5 minutes; 32 x 4 x 540 (4:40) 0.4075 / 0.425; 64 x 2 x 600 0.42 (seed 1337). 16 x 16 x 300 at lr 7e-4 0.4125;
    # beta2 0.99 0.40. Within the 5 minutes no setting beats 8 x 16 by more than the seeds' spread (~0.03).
    # From the current default's SFT run, on 2,000 held-out prompts (SFT 0.453; README), seeds 1 / 2: 8 x 16 x 600
    # +0.0065 (seed 1); with filter_groups +0.010 / +0.003 (3:52-4:32); filtered 16 x 16 x 450 +0.029 / +0.017 in
    # 6-6.3 minutes; filtered 16 x 16 x 350 +0.028 / +0.017 in 3:54 / 4:23. Generation then got 3x faster (one
    # prefill per distinct prompt, stopped rows dropped): on a fourth chain (SFT 0.459), seeds 1 / 2, 16 x 16 x 350
    # +0.0205 / +0.015 (3:41 / 3:00 of training), x 450 +0.028 / +0.029 (4:25 / 4:04), x 600 +0.0295 / +0.0315
    # (5:41 each, over the 5 minutes); 32 x 8 x 450 +0.041 / +0.039 (3:49 / 3:26), x 550 +0.0445 / +0.030;
    # 64 x 4 x 450 +0.0565 / +0.0575 (3:30 / 4:10): the defaults (more prompts per step, the same 256 rows).
    defaults = {"data.source": "synthetic", "data.synthetic_train": 20000, "data.synthetic_val": 400,
                "train.lr": 5e-4, "train.max_steps": 450, "train.warmup_steps": 10, "train.batch_size": 64,
                "rl.num_generations": 4, "rl.filter_groups": True, "train.weight_decay": 0.0, "train.schedule": "cosine",
                "train.min_lr_ratio": 0.1, "model.dropout": 0.0, "eval.interval": 200, "eval.sample_interval": 200,
                "eval.max_tokens": 0, "ckpt.interval": 600}

    def __init__(self, cfg: Config, tok: Tokenizer, gcfg: GPTConfig, info: DistInfo) -> None:
        super().__init__(cfg, tok, gcfg, info)
        r, T = cfg.rl, gcfg.block_size
        cache = hf_cache_dir(cfg)
        self.train_prompts, st = load_rl_prompts(cfg.data.source, "train", tok, T, r.max_new_tokens,
                                                 seed=cfg.train.seed, n_synthetic=cfg.data.synthetic_train,
                                                 cache_dir=cache)
        self.val_prompts, sv = load_rl_prompts(cfg.data.source, "val", tok, T, r.max_new_tokens, seed=cfg.train.seed,
                                               n_synthetic=cfg.data.synthetic_val, cache_dir=cache)
        for s in (st, sv):
            print0(f"data: {s['source']}: {s['n_examples']} prompts ({s['n_dropped']} dropped: no room for "
                   f"{r.max_new_tokens} new tokens in {T})")
        if gcfg.dropout > 0:
            raise ValueError(f"--stage rl needs model.dropout=0 (got {gcfg.dropout}): the old, new and reference "
                             "log-probs must come from the same function, or the ratio and KL are not 1 and 0 at the "
                             "start")
        self.names = reward_names(r.reward, r.reward_model)
        self.weights = reward_weights(r.reward_weights, self.names)
        labels = [display_name(n) for n in self.names]  # logged names: a function's own, as TRL logs them
        unique = len(set(labels)) == len(labels)
        self.labels = dict(zip(self.names, labels if unique else self.names, strict=True))
        self.functions = {n: builtin_reward if n == BUILTIN else import_reward(n)
                          for n in self.names if n != "reward_model"}
        self.scorer = RewardModelEnsemble(r.reward_model, tok, T, r.reward_model_combine) if r.reward_model else None
        self.members = self.scorer.member_names if self.scorer is not None else []  # logged, not in the total
        self.objective = GroupPolicyOptimization(r.beta, r.clip_eps, r.temperature)
        self.stream = ExampleStream(len(self.train_prompts), cfg.train.seed)
        self.generation = 0  # generated batches so far
        self.uses = 0  # optimizer steps taken on the current batch
        self.batches: list[dict] | None = None
        self.gathered: list | None = None  # every rank's batches, gathered by before_save for rank 0's checkpoint
        self.logs: dict[str, float] = {}  # the current batch's per-completion figures (global means)
        self.shown = ""  # a text sample of the current batch
        self.fresh = False  # the last train_batches call generated
        self.timings = {"generation": 0.0, "scoring": 0.0, "reference": 0.0}  # seconds, summed (scripts/bench.py)
        self.generated_tokens = 0
        self.tokens_per_micro_batch = cfg.train.batch_size * r.num_generations * T
        self.autocast = None
        self.reference = None
        # Under FSDP a forward is a collective: every rank must run the same number of decode steps.
        self.fixed_length = cfg.dist.strategy == "fsdp" and info.distributed

    def identity(self) -> dict[str, str]:
        """The prompts (every rank indexes one global order into them) and the rewards, which every rank must share."""
        prompts = hashlib.sha256(repr([p.ids for p in self.train_prompts + self.val_prompts]).encode()).hexdigest()
        rewards = repr((self.names, self.weights, self.cfg.rl.reward_model, self.cfg.rl.reward_model_combine))
        return {"rl prompts": prompts[:16], "rl rewards": rewards}

    # ------------------------------------------------------------------------------------------ frozen models
    def setup_frozen(self, policy: GPT, env: StageEnv) -> None:
        self.reference = env.wrap(frozen_reference(policy, env, "RL", self.cfg.init_from))
        self.autocast = env.autocast
        if self.scorer is not None:
            self.scorer.build(self.device, env.wrap)

    # ------------------------------------------------------------------------------------------ batches
    def train_batches(self, policy, n: int) -> list[dict]:
        """The current generated batch, or a new one after rl.updates_per_batch steps on it."""
        self.fresh = self.batches is None or self.uses >= self.cfg.rl.updates_per_batch
        if self.fresh:
            self.batches = self.generate(policy, n)
            self.generation += 1
            self.uses = 0
        self.uses += 1
        return self.batches

    def generate(self, policy, n: int) -> list[dict]:
        """n micro-batches of B prompts x G completions for this rank, rewarded, with advantages and reference
        log-probs."""
        cfg, r, info = self.cfg, self.cfg.rl, self.info
        B, W = cfg.train.batch_size, info.world_size
        order = self.stream.take(n * W * B)  # the generation's global prompts; every rank draws the same
        pad_to = max(len(self.train_prompts[i].ids) for i in order)  # one prompt length on every rank
        batches, rollouts = [], []
        for m in range(n):
            first = m * W * B + info.rank * B  # global index of this rank's first prompt in micro-batch m
            index = list(range(first, first + B))
            prompts = [self.train_prompts[order[i]] for i in index]
            t0 = device_clock(self.device)
            batch, ro = self.rollout(policy, prompts, index, r.temperature, pad_to)
            self.timings["generation"] += device_clock(self.device) - t0
            batches.append(batch)
            rollouts.append(ro)
        group_stds = self.score(batches, rollouts)
        self.shown = self.describe(rollouts[0], batches[0])
        if r.filter_groups:  # before the reference pass: the groups left out cost no forward there either
            batches = [informative_groups(b, std, r.num_generations)
                       for b, std in zip(batches, group_stds, strict=True)]
        t0 = device_clock(self.device)
        for batch in batches:
            with torch.no_grad(), self.autocast:
                batch["ref_logps"], _ = completion_logps(self.reference, batch, r.temperature)
        self.timings["reference"] += device_clock(self.device) - t0
        return batches

    def rollout(self, policy, prompts: list[RLPrompt], index: list[int], temperature: float, pad_to: int
                ) -> tuple[dict, Rollouts]:
        """G completions of each prompt (rows p * G + g) -> the batch's tensors and what rewards read."""
        G = self.cfg.rl.num_generations
        ids = [p.ids for p in prompts for _ in range(G)]
        keys = torch.tensor([row_key(self.cfg.train.seed, self.generation, i, g) for i in index for g in range(G)],
                            dtype=torch.long, device=self.device)
        with self.autocast:
            out = generate_rollouts(policy, ids, self.cfg.rl.max_new_tokens, temperature, keys, END_ID, PAD_ID,
                                    fixed_length=self.fixed_length, pad_to=pad_to)
        batch = {"input_ids": out.input_ids, "pad_mask": out.pad_mask, "positions": out.positions,
                 "completion_mask": out.completion_mask, "prompt_len": out.prompt_len,
                 "generation_tokens": out.forward_tokens}  # step_flops counts the generation's forwards
        gen = out.input_ids[:, out.prompt_len:]
        completion_ids = [row[mask].tolist() for row, mask in zip(gen, out.completion_mask, strict=True)]
        self.generated_tokens += int(out.completion_mask.sum())
        return batch, self.as_rollouts(prompts, completion_ids)

    def as_rollouts(self, prompts: list[RLPrompt], completion_ids: list[list[int]]) -> Rollouts:
        """What reward functions read, one entry per completion (each prompt's fields repeated G times)."""
        G = len(completion_ids) // len(prompts)
        rows = [p for p in prompts for _ in range(G)]
        texts = [chat.decode_reply(c, self.tok) for c in completion_ids]
        completions = [t if isinstance(p.prompt, str) else [{"role": "assistant", "content": t}]
                       for t, p in zip(texts, rows, strict=True)]
        names = sorted({k for p in prompts for k in p.columns})
        columns = {k: [p.columns.get(k) for p in rows] for k in names}
        return Rollouts([p.prompt for p in rows], completions, completion_ids, columns, [p.ids for p in rows],
                        [p.where for p in rows])

    # ------------------------------------------------------------------------------------------ rewards
    def total(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the rewards, (N,) fp32."""
        return sum(w * values[n] for n, w in zip(self.names, self.weights, strict=True))

    def guarded_rewards(self, rollouts: list[Rollouts]) -> list[dict[str, torch.Tensor]]:
        """Each micro-batch's rewards {name: (N,) fp32}. The functions run first, for every micro-batch; a failure on
        any rank stops every rank (its own error on the rank it failed on), before the reward model, whose forwards
        under FSDP are collectives that every rank must run the same number of times."""
        error, values = None, [{} for _ in rollouts]
        try:
            for v, ro in zip(values, rollouts, strict=True):
                for name, fn in self.functions.items():
                    v[name] = call_reward(name, fn, ro).to(self.device)
        except ValueError as e:
            error = e
        failed = all_reduce(torch.tensor([float(error is not None)], device=self.device), op="max")
        if error is not None:
            raise error
        if failed.item():
            raise ValueError("a reward failed on another rank (its error is in that rank's output)")
        if self.scorer is not None:
            for v, ro in zip(values, rollouts, strict=True):
                v["reward_model"], members = self.scorer(ro, self.device, self.autocast)
                v |= {name: members[:, k] for k, name in enumerate(self.members)}
        return values

    def global_sums(self, parts: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Named sums added up over ranks (one all-reduce; every rank passes the same names in the same order)."""
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                            for v in parts.values()])
        return dict(zip(parts, all_reduce(sums).tolist(), strict=True))

    def score(self, batches: list[dict], rollouts: list[Rollouts]) -> list[torch.Tensor]:
        """Rewards, advantages and the generation's figures (global means over ranks and micro-batches); returns
        each micro-batch's group standard deviations (B,)."""
        r = self.cfg.rl
        t0 = device_clock(self.device)
        values = self.guarded_rewards(rollouts)
        self.timings["scoring"] += device_clock(self.device) - t0
        totals = [self.total(v) for v in values]  # per micro-batch (N,)
        rewards = torch.cat(totals).double()  # this rank's (n N,)
        sums = self.global_sums({"reward": rewards.sum(), "completions": float(rewards.numel())}
                                | {n: torch.cat([v[n] for v in values]).sum() for n in self.names + self.members})
        mean = sums["reward"] / sums["completions"]
        # the batch's sample std in two passes (a one-pass sum of squares can come out negative in rounding)
        spread = self.global_sums({"sq": ((rewards - mean) ** 2).sum()})["sq"]
        batch_std = max(spread / max(sums["completions"] - 1, 1), 0.0) ** 0.5
        group_stds = []
        for batch, total in zip(batches, totals, strict=True):
            batch["advantages"], std = group_advantages(total, r.num_generations, r.scale_rewards, batch_std)
            batch["rewards"] = total
            group_stds.append(std)
        self.logs = self.generation_figures(batches, torch.cat(group_stds), sums)
        return group_stds

    def generation_figures(self, batches: list[dict], group_std: torch.Tensor, sums: dict[str, float]
                           ) -> dict[str, float]:
        """TRL's per-generation figures; group_std (groups,) of this rank, sums: score's global reward sums."""
        lengths = torch.cat([b["completion_mask"].sum(1) for b in batches]).double()  # (N,)
        ended = torch.cat([(b["completion_mask"] & (b["input_ids"][:, b["prompt_len"]:] == END_ID)).any(1)
                           for b in batches])  # (N,) a completion that reached <|end|>
        g = self.global_sums({"length": lengths.sum(), "clipped": (~ended).sum(), "std": group_std.sum(),
                              "zero_std": (group_std < ZERO_STD).sum(), "groups": float(len(group_std))})
        n = sums["completions"]
        logs = {"reward": sums["reward"] / n, "reward_std": g["std"] / g["groups"],
                "completions/mean_length": g["length"] / n, "completions/clipped_ratio": g["clipped"] / n,
                "frac_reward_zero_std": g["zero_std"] / g["groups"]}
        logs |= {f"rewards/{self.labels[name]}/mean": sums[name] / n for name in self.names}
        return logs | {f"rewards/{name}/mean": sums[name] / n for name in self.members}

    def step_logs(self) -> dict[str, float]:
        return self.logs

    # ------------------------------------------------------------------------------------------ accounting
    def batch_tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def step_flops(self, model: GPT, batches: list[dict]) -> int:
        """The policy's forward and backward over prompt + completion; on a step that generated, also the
        reference's forward and the generation: a forward over the tokens its forwards ran on (the prefill of the
        distinct prompts, then each decode step's held rows, the rows rl.filter_groups left out included), each
        counted at the context T of the batch (an upper bound on the attention term of a token decoded earlier)."""
        total = 0
        for b in batches:
            N, T = b["input_ids"].shape
            total += N * T * model.flops_per_token(T)
            if self.fresh:
                total += (N * T + b["generation_tokens"]) * model.flops_per_token(T, forward_only=True)
        return total

    def before_save(self) -> None:
        """Every rank's current batch to every rank (rank 0 writes them all): a resumed run continues on its own."""
        reused = self.batches is not None and self.uses < self.cfg.rl.updates_per_batch
        mine = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in self.batches] if reused \
            else None
        self.gathered = gather_objects(mine)

    def state_dict(self) -> dict:
        """The prompt stream, the generation counter, and a batch still to be reused (every rank's, with its use
        count): a resumed run continues on the same batch, generated by weights it no longer holds."""
        return {"stream": self.stream.state_dict(), "generation": self.generation, "uses": self.uses,
                "batches_by_rank": self.gathered, "logs": dict(self.logs), "shown": self.shown}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.generation, self.uses = int(state["generation"]), int(state["uses"])
        self.logs, self.shown = dict(state["logs"]), state["shown"]
        by_rank = state["batches_by_rank"] or [None]
        if by_rank[0] is None:  # the last batch was used up: the next step generates
            self.batches, self.uses = None, self.cfg.rl.updates_per_batch
            return
        if len(by_rank) != self.info.world_size:
            raise ValueError(f"this RL checkpoint was saved by {len(by_rank)} processes in the middle of a batch used "
                             f"for rl.updates_per_batch={self.cfg.rl.updates_per_batch} steps; resume it on "
                             f"{len(by_rank)} processes (this launch has {self.info.world_size})")
        self.batches = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}
                        for b in by_rank[self.info.rank]]

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, model, autocast, info: DistInfo, full: bool = False) -> dict[str, float]:
        """Greedy completions of every held-out prompt (this rank's share): exact match, per task, and reward."""
        tasks = sorted({str(p.columns["task"]) for p in self.val_prompts if p.columns.get("task") is not None})
        rows = self.cfg.train.batch_size * self.cfg.rl.num_generations
        pad_to = max(len(p.ids) for p in self.val_prompts)
        parts = dict.fromkeys(["right", "reward", "count"] + [f"{k}/{t}" for t in tasks for k in ("right", "count")]
                              + self.names, 0.0)
        for idx in eval_shares(len(self.val_prompts), rows, info.rank, info.world_size):
            prompts = [self.val_prompts[i] for i in idx] or self.val_prompts[:1]  # an idle rank's stand-in
            with autocast:
                out = generate_rollouts(model, [p.ids for p in prompts], self.cfg.rl.max_new_tokens, 0.0,
                                        torch.zeros(len(prompts), dtype=torch.long, device=self.device), END_ID,
                                        PAD_ID, fixed_length=self.fixed_length, pad_to=pad_to)
            gen = out.input_ids[:, out.prompt_len:]
            ro = self.as_rollouts(prompts, [row[m].tolist() for row, m in zip(gen, out.completion_mask, strict=True)])
            values = self.guarded_rewards([ro])[0]  # every rank scores (a reward model under FSDP: a collective)
            if idx:
                self.add_validation_sums(parts, prompts, ro, values, tasks)
        sums = self.global_sums(parts)
        n = max(sums["count"], 1)
        figures = {"reward": sums["reward"] / n}
        if any(p.columns.get("answer") is not None for p in self.val_prompts):
            figures["accuracy"] = sums["right"] / n
        figures |= {f"accuracy/{t}": sums[f"right/{t}"] / max(sums[f"count/{t}"], 1) for t in tasks}
        return figures | {f"rewards/{self.labels[name]}": sums[name] / n for name in self.names}

    def add_validation_sums(self, parts: dict, prompts: list[RLPrompt], ro: Rollouts, values: dict, tasks: list[str]
                            ) -> None:
        """Add one validation batch's exact matches, rewards and counts (overall and per task) to parts."""
        right = [float(answer_matches(completion_text(c), str(p.columns.get("answer"))))
                 for c, p in zip(ro.completions, prompts, strict=True)]
        parts["right"] += sum(right)
        parts["reward"] += self.total(values).double().sum().item()
        parts["count"] += len(prompts)
        for ok, p in zip(right, prompts, strict=True):
            if p.columns.get("task") is not None:
                parts[f"right/{p.columns['task']}"] += ok
                parts[f"count/{p.columns['task']}"] += 1
        for name in self.names:
            parts[name] += values[name].double().sum().item()

    def describe(self, ro: Rollouts, batch: dict) -> str:
        """The first group of a batch: its prompt, then each completion with its reward and advantage."""
        G = self.cfg.rl.num_generations
        prompt = ro.prompts[0] if isinstance(ro.prompts[0], str) else ro.prompts[0][-1]["content"]
        lines = [f"prompt: {prompt!r}"]
        for g in range(G):
            lines.append(f"  {completion_text(ro.completions[g])!r}  reward {batch['rewards'][g].item():.3f}  "
                         f"advantage {batch['advantages'][g].item():+.3f}")
        return "\n".join(lines)

    def sample(self, model, autocast) -> str:
        """The latest generated group (prompt, completions, rewards); before any, a greedy held-out answer."""
        if self.shown:
            return self.shown
        p = self.val_prompts[0]
        with autocast:
            out = generate_rollouts(model, [p.ids], self.cfg.rl.max_new_tokens, 0.0,
                                    torch.zeros(1, dtype=torch.long, device=self.device), END_ID, PAD_ID,
                                    fixed_length=self.fixed_length)
        text = chat.decode_reply(out.input_ids[0, out.prompt_len:][out.completion_mask[0]].tolist(), self.tok)
        return f"prompt: {p.prompt if isinstance(p.prompt, str) else p.prompt[-1]['content']!r}\n-> {text!r}"
