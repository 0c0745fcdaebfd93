"""Multi-process training with real `torchrun` launches on CPU (gloo): DDP and FSDP2 parity with one process,
accumulation under DDP and FSDP2 (no reduce-scatter before the last micro-step), SFT parity with very different
supervised-token counts per rank, resume across world sizes, agreed stops (a NaN on one rank, SIGTERM to the
launcher), elastic restarts, FSDP checkpoints loading in one process, SFT/DPO under torchrun (the DPO reference
sharded with the policy's bf16 mixed precision, exact at step 0), and data preparation racing on an empty cache.

A 2-process launch costs ~10 s of start-up here, so one launch of tests/dist_worker.py runs several trainings one
after the other in the same two processes, and the tests read what it left behind (metrics.jsonl, checkpoints, the
gradients before the first optimizer step, logits at each save). The reference is the same training in this
process, with per-process batch 2B instead of B.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.prepare import prepare
from data.sft import ExampleStream
from data.shards import open_prepared
from data.tokenizer import Tokenizer
from model.gpt import GPT, GPTConfig
from model.losses import token_ce_sum
from tests import dist_worker
from tests.choice_records import sum_records, write_jsonl
from tests.conftest import TINY_ARGS
from train import main
from training import checkpoint
from training.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent
# Dropout 0 and fp32 so runs on different world sizes compute the same function; a clip of 0.5 is active on every
# one of these steps (pre-clip norms are ~0.7-1.1), so clipping of DDP and FSDP (DTensor) gradients is compared too.
BASE = [*TINY_ARGS, "--model.dropout=0", "--train.precision=fp32", "--train.grad_clip=0.5", "--train.max_steps=10",
        "--log.interval=1", "--eval.interval=0", "--eval.max_tokens=576", "--log.tensorboard=false"]
GRAD_ATOL, LOSS_ATOL = 1e-6, 1e-5
# SFT with very different supervised-token counts on the two ranks (see uneven_sft_data): 2 x batch 2 against
# 1 x batch 4, fp32, no clipping (the dumped gradients are the normalised ones), from the `ref` run.
UNEVEN_SEED = 7
SFT_UNEVEN = ["--stage", "sft", "--train.max_steps=3", "--train.warmup_steps=1", "--train.optimizer=adamw",
              "--train.precision=fp32", "--model.dropout=0", "--train.grad_clip=0", f"--train.seed={UNEVEN_SEED}",
              "--eval.interval=0", "--log.interval=1", "--log.tensorboard=false", "--data.num_proc=1"]
RL_ARGS = ["--train.max_steps=3", "--eval.interval=0", "--data.synthetic_train=64", "--data.synthetic_val=6",
           "--rl.num_generations=4", "--rl.max_new_tokens=8", "--rl.reward=tests.rl_rewards:digit_share",
           "--train.precision=fp32", "--train.lr=1e-2", "--log.interval=1", "--log.tensorboard=false",
           "--data.num_proc=1", "--rl.filter_groups=false"]
RM_ARGS = ["--train.max_steps=3", "--eval.interval=3", "--data.synthetic_train=32", "--data.synthetic_val=6",
           "--train.precision=fp32", "--log.interval=1", "--log.tensorboard=false", "--data.num_proc=1"]
# Every candidate model option of model/gpt.py (they add parameters, no collective), 3 steps
MODEL_OPTIONS = ["--model.qk_norm=true", "--model.relu_squared=true", "--model.logit_softcap=10",
                 "--model.residual_scalars=true", "--model.value_embeds=1", "--model.bigram_buckets=512",
                 "--train.max_steps=3"]
LONG_ANSWER = "The answer is long: for each item in the list, if the item is not None, return its value."


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    """Step -> training loss (the last record of a step wins: a resumed run appends)."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}


def assert_losses_match(run: Path, ref: dict[int, float], steps=range(1, 11)) -> None:
    got = train_losses(run)
    assert sorted(got) == list(steps) or set(steps) <= set(got), (run.name, sorted(got))
    bad = {s: (got[s], ref[s]) for s in steps if abs(got[s] - ref[s]) > LOSS_ATOL}
    assert not bad, f"{run.name}: losses differ from the single-process run at steps {bad}"


def assert_grads_match(got: dict, ref: dict, what: str) -> None:
    assert sorted(got) == sorted(ref), what
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= GRAD_ATOL, f"{what}: gradients differ from the single-process run by {worst:.2e}"


def uneven_sft_data(folder: Path, n: int = 16) -> Path:
    """A folder of chat records (train.jsonl, validation.jsonl) whose answers are short ("Yes.") in the rows that
    rank 0 of 2 draws and long (LONG_ANSWER) in rank 1's: the SFT batcher takes the next 4 examples of its shuffled
    order for each step of 2 ranks x batch 2, rank 1 the last two, so the data follow that order (ExampleStream,
    the batcher's own, with the run's seed)."""
    order = ExampleStream(n, UNEVEN_SEED).take(n)
    rank1_rows = {order[j] for j in range(n) if j % 4 >= 2}

    def chat(i: int, answer: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                        {"role": "assistant", "content": answer}]}) + "\n"

    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(chat(i, LONG_ANSWER if i in rank1_rows else "Yes.") for i in range(n)))
    (folder / "validation.jsonl").write_text(chat(0, "Yes.") + chat(1, LONG_ANSWER))
    return folder


def micro_steps(dump: Path, name: str, rank: int) -> list[dict]:
    """What tests/dist_worker.py saw of each of the run's first steps on that rank (see its docstring)."""
    return [json.loads(line) for line in (dump / f"{name}.micro.rank{rank}").read_text().splitlines()]


def main1(argv: list[str]) -> dict:
    """train.py's main in this process on one thread, as the workers run (OMP_NUM_THREADS=1): on 2 shared cores,
    two threads of matmuls contending with another process are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def torchrun(*args: str, extra: tuple = ()) -> list[str]:
    """The launcher command for 2 worker processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *extra,
            str(ROOT / "tests" / "dist_worker.py"), *args]


def worker_env(cache: Path, dump: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTRAIN_CACHE": str(cache), "DIST_TEST_DUMP": str(dump),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT), "DIST_TEST_HANG_S": "200"}  # a hung worker prints its stack and exits
    env.pop("GPTRAIN_FAULT", None)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory, corpus_dir):
    """Single-process references (in this process), then one 2-process launch running every training below."""
    root = tmp_path_factory.mktemp("dist")
    runs, dump, cache = root / "runs", root / "dump", root / "empty-cache"
    dump.mkdir()
    data = ["--data", str(corpus_dir)]

    def single(name: str, *args: str):
        with dist_worker.hooks(str(dump), name):
            return main1([*data, "--out", str(runs / name), *args])

    single("ref", *BASE, "--train.batch_size=8")
    # Two machines whose prepared copies of the data differ (one was prepared with a document cap): each rank gets
    # its own folder, as from its own disk; both must stop, naming both hashes.
    tok = Tokenizer.load(runs / "ref" / "tokenizer.json")
    for rank, max_docs in ((0, 0), (1, 15)):
        prepare(str(corpus_dir), tok, root / f"prep{rank}", max_docs=max_docs, workers=1, verbose=False)
    hashes = [open_prepared(root / f"prep{rank}").hash for rank in (0, 1)]
    # ... and a machine whose copy is too small for one global batch: it fails alone, after the process group is up
    tiny = root / "tiny-corpus"
    for split in ("train", "val"):
        (tiny / split).mkdir(parents=True)
        (tiny / split / "a.txt").write_text("def f(x):\n    return x\n" * 8)
    prepare(str(tiny), tok, root / "small1", workers=1, verbose=False)
    (root / "small0").symlink_to(root / "prep0")
    single("r12", *BASE, "--train.batch_size=8", "--train.stop_after_steps=5")  # resumed by 2 processes below
    single("options_ref", *BASE, *MODEL_OPTIONS, "--train.batch_size=8")
    sft_data = ["--init-from", str(runs / "ref"), "--data", str(uneven_sft_data(root / "sft-uneven"))]
    single("sft_uneven_ref", *sft_data, *SFT_UNEVEN, "--train.batch_size=4")

    # RL: each rank generates for its own prompts; 2 x 2 prompts against 1 x 4 (fp32, the digit reward varies)
    rl = ["--stage", "rl", "--init-from", str(runs / "ref"), "--data", "synthetic", *RL_ARGS]
    single("rl_ref", *rl, "--out", str(runs / "rl_ref"), "--train.batch_size=4")
    # ... and with the groups of equal rewards left out (a reward that varies on `sort` prompts only: a rank may keep
    # nothing but its placeholder group)
    rl_filter = [*rl, "--rl.reward=tests.rl_rewards:digit_share_on_sort", "--rl.filter_groups=true"]
    single("rl_filter_ref", *rl_filter, "--out", str(runs / "rl_filter_ref"), "--train.batch_size=4")
    # RM from a run with an untied output head (unused by a score): 2 x 2 pairs against 1 x 4 under DDP
    single("untied", *BASE, "--train.batch_size=8", "--model.tie_embeddings=false", "--train.max_steps=2")
    rm = ["--stage", "rm", "--init-from", str(runs / "untied"), "--data", "synthetic", *RM_ARGS]
    single("rm_ref", *rm, "--out", str(runs / "rm_ref"), "--train.batch_size=4")
    choices = write_jsonl(root / "choices.jsonl", sum_records(9))  # 34 (record, choice) pairs, uneven over 2 ranks
    sft_dpo = ["--train.max_steps=3", "--eval.interval=0", "--data.synthetic_train=64", "--data.synthetic_val=6",
               "--train.batch_size=2", "--log.interval=1", "--log.tensorboard=false", "--data.num_proc=1"]
    plan = [
        # parity: 2 x batch 4 and 2 x (batch 2 x 2 micro-steps) against 1 x batch 8
        [*data, "--out", str(runs / "ddp"), *BASE, "--train.batch_size=4"],
        [*data, "--out", str(runs / "accum"), *BASE, "--train.batch_size=2", "--train.grad_accum=2"],
        [*data, "--out", str(runs / "accum_fsdp"), *BASE, "--train.batch_size=2", "--train.grad_accum=2",
         "--dist.strategy=fsdp"],
        # FSDP2 accumulation over 4 micro-steps of batch 1 (no reduce-scatter before the last), 4 steps
        [*data, "--out", str(runs / "accum4_fsdp"), *BASE, "--train.batch_size=1", "--train.grad_accum=4",
         "--dist.strategy=fsdp", "--train.stop_after_steps=4"],
        # FSDP2 with every model option: their (1,)-shaped scalars and gates sharded over 2 ranks like the rest
        [*data, "--out", str(runs / "options_fsdp"), *BASE, *MODEL_OPTIONS, "--train.batch_size=4",
         "--dist.strategy=fsdp"],
        # SFT parity with very different supervised-token counts on the two ranks
        [*sft_data, "--out", str(runs / "sft_uneven"), *SFT_UNEVEN, "--train.batch_size=2"],
        # 1 process -> 2 processes, and a 2-process checkpoint for the other way round
        ["--out", str(runs / "r12"), "--resume", "--train.batch_size=4"],
        [*data, "--out", str(runs / "r21"), *BASE, "--train.batch_size=4", "--train.stop_after_steps=5"],
        # FSDP2: 5 steps (validation on 9 blocks, uneven over 2 ranks; health and histograms gather), then resume;
        # an update/weight band that every update leaves, so each group warns (rank 0 alone says it)
        [*data, "--out", str(runs / "fsdp"), *BASE, "--train.batch_size=4", "--dist.strategy=fsdp",
         "--train.stop_after_steps=5", "--eval.interval=2", "--log.health_interval=2", "--log.hist_interval=3",
         "--health.ratio_low=0", "--health.ratio_high=1e-9"],
        ["--out", str(runs / "fsdp"), "--resume"],
        # fine-tuning stages under torchrun: SFT with DDP, DPO (its reference sharded like the policy) with FSDP
        ["--stage", "sft", "--init-from", str(runs / "ref"), "--out", str(runs / "sft"), *sft_dpo],
        # multiple choice on that run, the pairs split across the ranks (compared with one process below)
        ["--evaluate", str(runs / "sft"), "--choices", str(choices), "--chat", "--batch-size", "3", "--device", "cpu",
         "--json", str(root / "mc.json")],
        ["--stage", "dpo", "--init-from", str(runs / "ref"), "--out", str(runs / "dpo"), *sft_dpo,
         "--dist.strategy=fsdp"],
        [*rl, "--out", str(runs / "rl"), "--train.batch_size=2"],
        [*rl_filter, "--out", str(runs / "rl_filter"), "--train.batch_size=2"],
        [*rm, "--out", str(runs / "rm"), "--train.batch_size=2"],
        # RL under FSDP2: fixed-length generation (every forward a collective), the reference sharded, validation
        [*rl, "--out", str(runs / "rl_fsdp"), "--train.batch_size=2", "--dist.strategy=fsdp", "--train.max_steps=2",
         "--eval.interval=2"],
        # DPO under FSDP2 bf16, one step: the reference is sharded with the policy's mixed precision
        ["--stage", "dpo", "--init-from", str(runs / "ref"), "--out", str(runs / "dpo_bf16"), *sft_dpo,
         "--dist.strategy=fsdp", "--train.precision=bf16", "--model.dropout=0", "--train.batch_size=1",
         "--train.max_steps=10", "--train.stop_after_steps=1", "--data.synthetic_train=8", "--data.synthetic_val=1"],
        # FSDP2 with bf16 compute (MixedPrecisionPolicy(param_dtype=bf16)); fp32 master weights
        [*data, "--out", str(runs / "fsdp_bf16"), *BASE, "--train.batch_size=4", "--dist.strategy=fsdp",
         "--train.precision=bf16", "--train.max_steps=3"],
        # a 6-second time budget turned into a step count (rank 0's, on every rank), then re-planned when every step
        # gets 100 ms slower from step 32 (the trainer's fault hook)
        ["--env", "GPTRAIN_FAULT=slow@32", *data, "--out", str(runs / "budget"), *BASE, "--train.batch_size=4",
         "--train.time_budget_min=0.1"],
        # every rank gathers every rank's data and tokenizer hashes: a mismatch stops both (then the next run)
        ["--expect-error", "--data", str(root / "prep{rank}"), "--out", str(runs / "mismatch"), *BASE,
         "--train.batch_size=4"],
        # a reward that fails on rank 1 only: both ranks stop at the same generation, nothing saved
        ["--expect-error", *rl, "--out", str(runs / "rl_fail"), "--train.batch_size=2",
         "--rl.reward=tests.rl_rewards:fails_on_rank1"],
        # rank 1 cannot build its loader: both ranks stop at once (rank 0 names rank 1's reason), none waits
        ["--expect-error", "--data", str(root / "small{rank}"), "--out", str(runs / "small"), *BASE,
         "--train.batch_size=4"],
        # last (it fails): a NaN loss on rank 1 only at step 3, after the checkpoint of step 2
        ["--env", "GPTRAIN_FAULT=nan_loss@3:1", *data, "--out", str(runs / "nan"), *BASE, "--train.batch_size=4",
         "--ckpt.interval=2"],
    ]
    argv = []
    for args in plan:
        argv += [*args, "--then"]
    t0 = time.perf_counter()
    with open(root / "launch.log", "w") as f:  # a file, so a hanging launch can be watched
        proc = subprocess.run(torchrun(*argv[:-1]), env=worker_env(cache, dump), stdout=f, stderr=subprocess.STDOUT,
                              timeout=240, cwd=ROOT)
    seconds = time.perf_counter() - t0
    log = (root / "launch.log").read_text()
    assert "rank 0: finished budget" in log and "rank 1: finished budget" in log, log[-6000:]
    return {"runs": runs, "dump": dump, "cache": cache, "log": log, "rc": proc.returncode, "seconds": seconds,
            "prepared_hashes": hashes, "choices": choices, "mc": root / "mc.json",
            "ref": train_losses(runs / "ref"), "ref_grads": torch.load(dump / "ref.grads.rank0.pt")}


# ----------------------------------------------------------------------------------------------- parity
def test_ddp_matches_one_process_with_the_global_batch(dist):
    """2 processes x batch 4 == 1 process x batch 8: gradients after step 1 on both ranks, losses over 10 steps."""
    for rank in (0, 1):
        got = torch.load(dist["dump"] / f"ddp.grads.rank{rank}.pt")
        assert_grads_match(got, dist["ref_grads"], f"DDP rank {rank}")
    assert_losses_match(dist["runs"] / "ddp", dist["ref"])
    assert "world size 2 (gloo), per-device batch 4 x 64 tokens, accumulation 1, global batch 512 tokens/step" \
        in dist["log"]


def test_ddp_accumulation_matches_one_large_micro_step(dist):
    """2 processes x 2 micro-steps of batch 2 == 2 processes x batch 4 (== 1 process x batch 8)."""
    for rank in (0, 1):
        assert_grads_match(torch.load(dist["dump"] / f"accum.grads.rank{rank}.pt"),
                           torch.load(dist["dump"] / f"ddp.grads.rank{rank}.pt"), f"accumulation rank {rank}")
    assert_losses_match(dist["runs"] / "accum", train_losses(dist["runs"] / "ddp"))
    assert "per-device batch 2 x 64 tokens, accumulation 2, global batch 512 tokens/step" in dist["log"]


def test_fsdp_trains_like_one_process_and_resumes(dist):
    """FSDP2 (fp32: MixedPrecisionPolicy without param_dtype): same gradients and losses, DTensor clipping, every
    rank gathers at every save, resume loads full state into the sharded model (steps 6-10)."""
    for rank in (0, 1):
        assert_grads_match(torch.load(dist["dump"] / f"fsdp.grads.rank{rank}.pt"), dist["ref_grads"],
                           f"FSDP rank {rank}")
    assert_losses_match(dist["runs"] / "fsdp", dist["ref"])
    saves = [(dist["dump"] / f"fsdp.saves.rank{r}").read_text().split() for r in (0, 1)]
    assert saves[0] == saves[1] and len(saves[0]) == 2, saves  # stop_after_steps=5, then the end of the resumed run
    # accumulation through set_requires_gradient_sync(False): 2 x (batch 2 x 2 micro-steps)
    assert_grads_match(torch.load(dist["dump"] / "accum_fsdp.grads.rank1.pt"), dist["ref_grads"], "FSDP accumulation")
    assert_losses_match(dist["runs"] / "accum_fsdp", dist["ref"])
    metrics = read_metrics(dist["runs"] / "fsdp")
    assert [r["step"] for r in metrics if "val/loss" in r] == [0, 2, 4, 6, 8, 10]  # uneven validation: no hang
    assert any("grad_norm/block_0" in r for r in metrics)


def test_health_warnings_are_said_once_under_torchrun(dist):
    """Both ranks watch the (synchronised) figures without a collective of their own; rank 0 alone prints: each
    group's warning once at the first measured step of the FSDP2 run (2) and of its resumption (6, the watch starts
    afresh), and each part's summary line once."""
    log = dist["log"]
    for step in (2, 6):
        for group in ("matrices", "vectors"):
            assert log.count(f"health warning (update_ratio) at step {step}: update_ratio/{group} is ") == 1, log[-6000:]
    assert log.count("health: 2 warning(s): update_ratio 2") == 2


def test_fsdp_with_every_model_option_matches_one_process(dist):
    """The model options add parameters and no collective: FSDP2 over 2 ranks gives the single process's gradients
    (each option's parameters among them) and losses."""
    ref = torch.load(dist["dump"] / "options_ref.grads.rank0.pt")
    assert {"bigram_embed.weight", "value_embeds.0.weight", "blocks.1.x0_lambda", "blocks.0.attn.q_norm.weight",
            "blocks.1.attn.ve_gate"} <= set(ref)
    for rank in (0, 1):
        assert_grads_match(torch.load(dist["dump"] / f"options_fsdp.grads.rank{rank}.pt"), ref, f"options rank {rank}")
    assert_losses_match(dist["runs"] / "options_fsdp", train_losses(dist["runs"] / "options_ref"), steps=range(1, 4))


def test_fsdp_accumulation_reduce_scatters_on_the_last_micro_step_only(dist):
    """2 processes x 4 micro-steps of batch 1 under FSDP2: the backward of a no-sync micro-step leaves the sharded
    parameters without .grad (their reduce-scatter has not run), the last one sets them; same gradients and losses
    as 1 process x batch 8."""
    n_params = len(dist["ref_grads"])
    for rank in (0, 1):
        steps = micro_steps(dist["dump"], "accum4_fsdp", rank)
        assert len(steps) == 4 and all(s["grads_set"] == [0, 0, 0, 0, n_params] for s in steps), steps
        assert_grads_match(torch.load(dist["dump"] / f"accum4_fsdp.grads.rank{rank}.pt"), dist["ref_grads"],
                           f"FSDP 4 micro-steps, rank {rank}")
    assert_losses_match(dist["runs"] / "accum4_fsdp", dist["ref"], steps=range(1, 5))


def test_sft_parity_with_unequal_supervised_tokens_across_ranks(dist):
    """SFT, 2 processes x batch 2 whose ranks hold very different numbers of assistant tokens == 1 process x batch 4:
    the loss is normalised by the global count, not averaged over per-rank means (which would differ)."""
    dump, runs = dist["dump"], dist["runs"]
    counts = [[s["counts"][0] for s in micro_steps(dump, "sft_uneven", r)] for r in (0, 1)]
    assert len(counts[0]) == 3 and all(c1 > 5 * c0 for c0, c1 in zip(*counts, strict=True)), counts
    ref_grads = torch.load(dump / "sft_uneven_ref.grads.rank0.pt")
    for rank in (0, 1):
        assert_grads_match(torch.load(dump / f"sft_uneven.grads.rank{rank}.pt"), ref_grads, f"SFT rank {rank}")
    ref_losses = train_losses(runs / "sft_uneven_ref")
    assert sorted(ref_losses) == [1, 2, 3]
    assert_losses_match(runs / "sft_uneven", ref_losses, steps=range(1, 4))

    # The test can tell the two normalisations apart: from the starting weights and the ranks' own first
    # micro-batches, the global one reproduces the single-process gradients, a mean of per-rank means does not.
    start = checkpoint.load(runs / "ref")
    model = GPT(GPTConfig.from_dict(start["model_config"]))
    load_weights(model, start["model"])
    parts = [token_ce_sum(model(b["input_ids"]), b["labels"])
             for r in (0, 1) for b in torch.load(dump / f"sft_uneven.batches.rank{r}.pt")]
    assert [int(n) for _, n in parts] == [c[0] for c in counts]

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    global_mean = sum(s for s, _ in parts) / sum(n for _, n in parts)
    assert_grads_match(grads(global_mean), ref_grads, "global normalisation, recomputed here")
    mean_of_means = grads(sum(s / n for s, n in parts) / 2)
    worst = max((mean_of_means[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    assert worst > 100 * GRAD_ATOL, worst


def test_fsdp_bf16_dpo_reference_equals_the_policy_at_step_0(dist):
    """FSDP2 bf16 DPO, dropout 0: the reference is sharded with the policy's mixed precision, so at step 0 its
    log-probs equal the policy's exactly: step 1's (pre-update) loss is exactly ln 2 in fp32, every reward 0. Each
    rank holds half of the reference's weights."""
    (row,) = [r for r in read_metrics(dist["runs"] / "dpo_bf16") if "train/loss" in r]
    assert row["step"] == 1 and row["train/loss"] == torch.tensor(math.log(2), dtype=torch.float32).item(), row
    assert row["train/rewards/chosen"] == row["train/rewards/rejected"] == row["train/rewards/margins"] == 0.0, row
    sizes = [json.loads((dist["dump"] / f"dpo_bf16.reference.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["sharded"] and s["full"] == sizes[0]["full"] for s in sizes), sizes
    full = sizes[0]["full"]
    assert sum(s["local"] for s in sizes) == full and max(s["local"] for s in sizes) < 0.6 * full, sizes


def test_fsdp_bf16_keeps_fp32_master_weights(dist):
    ckpt = checkpoint.load(dist["runs"] / "fsdp_bf16")
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in ckpt["optimizer"]["state"].values()} == {torch.float32}
    losses = train_losses(dist["runs"] / "fsdp_bf16")
    assert sorted(losses) == [1, 2, 3] and abs(losses[1] - dist["ref"][1]) < 0.02  # bf16 rounding only


def test_fsdp_checkpoint_gives_identical_logits_in_one_process(dist):
    ckpt = checkpoint.load(dist["runs"] / "fsdp")
    assert ckpt["step"] == 10 and ckpt["world_size"] == 2
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    load_weights(model, ckpt["model"])
    model.eval()
    with torch.no_grad():
        logits = model(dist_worker.probe_input(model.cfg.vocab_size, model.cfg.block_size))
    sharded = torch.load(dist["dump"] / "fsdp.logits.pt")  # the FSDP model's own logits at that save
    assert torch.allclose(logits, sharded, rtol=0, atol=1e-5), (logits - sharded).abs().max()
    # ... and the optimizer state was gathered in full (every parameter's moments, unsharded shapes)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    exp_avg = {k: v["exp_avg"].shape for k, v in ckpt["optimizer"]["state"].items()}
    assert exp_avg == {k: shapes[k] for k in exp_avg} and len(exp_avg) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------- resume
def test_resume_across_world_sizes(dist, corpus_dir):
    """1 process -> 2 processes (in the launch) and 2 -> 1 (here), keeping batch_size x world size; a different
    global batch is refused with a message saying what to use."""
    runs = dist["runs"]
    assert "resumed from" in dist["log"] and (runs / "r12" / "env.resume.json").exists()
    assert_losses_match(runs / "r12", dist["ref"])
    with pytest.raises(ValueError, match=r"1 x 4.*global batch must stay 8.*--train.batch_size=8"):
        main1(["--out", str(runs / "r21"), "--resume"])
    main1(["--out", str(runs / "r21"), "--resume", "--train.batch_size=8"])
    assert_losses_match(runs / "r21", dist["ref"])


# ----------------------------------------------------------------------------------------------- agreed stops
def test_nan_on_one_rank_stops_both_at_the_same_step(dist):
    runs = dist["runs"]
    assert dist["rc"] != 0
    for rank in (0, 1):
        line = (dist["dump"] / f"nan.status.rank{rank}").read_text().strip()
        assert line.startswith(f"rank {rank}: error:"), line
        assert "non-finite loss (nan) at step 3" in line and "last good checkpoint" in line, line
        assert float(line.rsplit(", ", 1)[1].split()[0]) < 60, line
    ckpt = checkpoint.load(runs / "nan")
    assert ckpt["step"] == 2
    assert sorted(train_losses(runs / "nan")) == [1, 2]


def test_time_budget_ends_every_rank_at_the_same_step(dist):
    for rank in (0, 1):
        assert (dist["dump"] / f"budget.status.rank{rank}").read_text().startswith(f"rank {rank}: finished budget")
    ckpt = checkpoint.load(dist["runs"] / "budget")
    first = int(dist["log"].split("time budget 0.1 min: ")[1].split("max_steps=")[1].split()[0])
    # the re-plan that fixed the count was printed (by rank 0) and every rank stopped there
    assert ckpt["step"] == ckpt["max_steps"] < first and f"-> max_steps={ckpt['max_steps']} (was" in dist["log"]


def assert_same_series(ref: list[dict], got: list[dict], keys, steps: list[int] | None = None) -> None:
    """Each key logged at the same steps in both runs' metrics (those steps when given, else at least one), with
    values within LOSS_ATOL."""
    for key in keys:
        want = {r["step"]: r[key] for r in ref if key in r}
        have = {r["step"]: r[key] for r in got if key in r}
        assert sorted(want) == sorted(have) and want, key
        if steps is not None:
            assert sorted(want) == steps, (key, sorted(want))
        assert all(abs(have[s] - want[s]) <= LOSS_ATOL for s in want), (key, have, want)


def test_rl_under_torchrun_equals_one_process(dist):
    """2 ranks x 2 prompts x 4 completions == 1 rank x 4 prompts: the same completions (keyed by the global prompt
    index), the same rewards and the same loss at every step; under FSDP2 generation runs a fixed length on every
    rank, and the first step's KL is exactly 0. With rl.filter_groups the same: a rank left with no informative
    group trains on a placeholder that adds nothing."""
    ref = read_metrics(dist["runs"] / "rl_ref")
    got = read_metrics(dist["runs"] / "rl")
    assert_same_series(ref, got, ("train/loss", "train/reward", "train/kl", "train/completions/mean_length"), [1, 2, 3])
    assert len({r["train/reward"] for r in ref if "train/reward" in r}) > 1  # a reward that varies
    ref, got = read_metrics(dist["runs"] / "rl_filter_ref"), read_metrics(dist["runs"] / "rl_filter")
    assert_same_series(ref, got, ("train/loss", "train/kl", "train/entropy", "train/frac_reward_zero_std"), [1, 2, 3])
    zero_std = [r["train/frac_reward_zero_std"] for r in ref if "train/frac_reward_zero_std" in r]
    assert any(0 < z < 1 for z in zero_std), zero_std  # groups of both kinds: some were left out
    assert any(r["train/loss"] != 0 for r in ref if "train/loss" in r)
    fsdp = read_metrics(dist["runs"] / "rl_fsdp")
    assert [r["train/kl"] for r in fsdp if "train/kl" in r][0] == 0.0
    assert [r["step"] for r in fsdp if "val/reward" in r] == [0, 2]
    assert checkpoint.latest(dist["runs"] / "rl_fsdp") is not None


def test_reward_model_under_torchrun_equals_one_process_with_an_untied_head(dist):
    """2 ranks x 2 pairs == 1 rank x 4 pairs in loss and accuracy at every step, from a start whose output head is
    untied: a score never uses it, so it is frozen (DDP would otherwise stall waiting for its gradient)."""
    ref, got = read_metrics(dist["runs"] / "rm_ref"), read_metrics(dist["runs"] / "rm")
    assert_same_series(ref, got, ("train/loss", "train/accuracy", "train/margin", "val/accuracy", "val/loss"))
    start = checkpoint.load(dist["runs"] / "untied")["model"]
    end = checkpoint.load(dist["runs"] / "rm")["model"]
    assert torch.equal(start["lm_head.weight"], end["lm_head.weight"])  # frozen
    assert not torch.equal(start["blocks.0.attn.q_proj.weight"], end["blocks.0.attn.q_proj.weight"])


def test_sft_and_dpo_under_torchrun(dist):
    for stage in ("sft", "dpo"):
        ckpt = checkpoint.load(dist["runs"] / stage)
        assert ckpt["step"] == 3 and ckpt["stage"] == stage and ckpt["world_size"] == 2
        assert sorted(train_losses(dist["runs"] / stage)) == [1, 2, 3]
    assert any("train/rewards/margins" in r for r in read_metrics(dist["runs"] / "dpo"))


def test_multiple_choice_under_torchrun_equals_one_process(dist):
    """scripts/evaluate.py --choices in the launch (34 pairs, 17 per rank in batches of 3) gives the single-process
    log-likelihoods (each pair scored on one rank; batches of other rows and padding) and the same accuracies."""
    assert "rank 0: finished mc.json" in dist["log"] and "rank 1: finished mc.json" in dist["log"], dist["log"][-3000:]
    got = json.loads(dist["mc"].read_text())
    one = dist_worker.evaluate_main([str(dist["runs"] / "sft"), "--choices", str(dist["choices"]), "--chat",
                                     "--device", "cpu"])
    assert got["world_size"] == 2 and one["world_size"] == 1
    assert got["mc_records"] == one["mc_records"] == 9
    for a, b in zip(got["mc_loglikelihoods"], one["mc_loglikelihoods"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    for key in ("mc_accuracy", "mc_accuracy_norm", "mc_accuracy_bytes"):
        assert got[key] == one[key], key


def test_data_is_prepared_once_from_an_empty_cache(dist):
    """Both ranks started on an empty cache: one tokenizer and one prepared folder, no stray temporary files."""
    cache = dist["cache"]
    assert [p.suffix for p in (cache / "tokenizers").iterdir() if not p.name.endswith(".lock")] == [".json"]
    (shard_dir,) = (cache / "shards").iterdir()
    assert sorted(p.name for p in shard_dir.iterdir() if not p.name.startswith(".")) == \
        ["manifest.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"]
    assert not list(shard_dir.glob(".*.partial")) and not list(shard_dir.glob(".*.tmp"))
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["key"]["tokenizer_hash"] == Tokenizer.load(
        shard_dir / "tokenizer.json").hash


def test_a_set_up_failure_on_one_rank_stops_every_rank_at_once(dist):
    lines = [(dist["dump"] / f"small.status.rank{rank}").read_text().strip() for rank in (0, 1)]
    assert lines[1].startswith("rank 1: error:") and "too small" in lines[1], lines[1]
    assert lines[0].startswith("rank 0: error: rank 1 could not set up:") and "too small" in lines[0], lines[0]
    assert all(float(line.rsplit(", ", 1)[1].split()[0]) < 30 for line in lines), lines


def test_a_reward_failing_on_one_rank_stops_every_rank(dist):
    lines = [(dist["dump"] / f"rl_fail.status.rank{rank}").read_text().strip() for rank in (0, 1)]
    assert lines[1].startswith("rank 1: error: reward 'tests.rl_rewards:fails_on_rank1' raised RuntimeError: rank 1 "
                               "cannot score"), lines[1]
    assert lines[0].startswith("rank 0: error: a reward failed on another rank"), lines[0]
    assert checkpoint.latest(dist["runs"] / "rl_fail") is None


def test_ranks_with_different_prepared_data_both_stop_naming_both_hashes(dist):
    h0, h1 = dist["prepared_hashes"]
    assert h0 != h1
    for rank in (0, 1):
        line = (dist["dump"] / f"mismatch.status.rank{rank}").read_text().strip()
        assert line.startswith(f"rank {rank}: error: ranks disagree on the prepared data"), line
        assert h0 in line and h1 in line, line
    assert not (dist["runs"] / "mismatch" / "checkpoints").exists()


def test_fsdp_refuses_fp16(tmp_path, corpus_dir):
    with pytest.raises(ValueError, match="fp16 is not supported with --dist.strategy=fsdp"):
        main(["--data", str(corpus_dir), "--out", str(tmp_path / "x"), *TINY_ARGS, "--dist.strategy=fsdp",
              "--train.precision=fp16"])


def test_sigterm_to_torchrun_and_elastic_restart_leave_a_resumable_run(tmp_path, corpus_dir):
    """torchrun --max-restarts=1 with --resume: rank 1 dies after step 7 of the first attempt; the restart resumes
    from the checkpoint of step 5 and repeats steps 6-7 exactly. Then SIGTERM to the launcher: both ranks agree,
    save at the same step boundary and exit; the run resumes in one process."""
    out, dump = tmp_path / "elastic", tmp_path / "dump"
    dump.mkdir()
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the store shared between torchrun and the workers (the default),
    # a restarted worker can read the previous attempt's gloo addresses (pytorch/pytorch#135712) and fail to connect.
    env = {**worker_env(os.environ["GPTRAIN_CACHE"], dump), "DIST_TEST_CRASH": "7",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    args = ["--data", str(corpus_dir), "--out", str(out), "--resume", *BASE, "--train.batch_size=4",
            "--train.max_steps=100000", "--ckpt.interval=5", "--eval.interval=0"]
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(torchrun(*args, extra=("--max-restarts=1",)), env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                text = log_path.read_text()
                if "resumed from" in text and "step     9/" in text.split("resumed from", 1)[1]:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"no restarted steps: {log_path.read_text()[-4000:]}")
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            assert time.time() - t0 < 60
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert "resumed from" in text and "at step 5" in text, text[-4000:]
    assert "received SIGTERM" in text and "(signal)" in text, text[-4000:]
    assert "rank 0: finished elastic" in text and "rank 1: finished elastic" in text, text[-4000:]
    by_step: dict[int, list[float]] = {}
    for r in read_metrics(out):
        if "train/loss" in r:
            by_step.setdefault(r["step"], []).append(r["train/loss"])
    # The first attempt logged steps 1-6 (7 too, if rank 0 got there before rank 1 died); the restart went on from
    # the checkpoint of step 5, repeating those steps bitwise.
    repeated = {s: v for s, v in by_step.items() if len(v) > 1}
    assert 6 in repeated and set(repeated) <= {6, 7}, by_step
    assert all(len(v) == 2 and v[0] == v[1] for v in repeated.values()), repeated
    saves = [(dump / f"elastic.saves.rank{r}").read_text().split() for r in (0, 1)]
    assert saves[0] == saves[1], saves  # every save (5, 10, ..., the signal's) on both ranks of both attempts
    saved = checkpoint.load(out)
    step = saved["step"]
    assert step > 9 and saved["world_size"] == 2
    main1(["--out", str(out), "--resume", "--train.batch_size=8", f"--train.stop_after_steps={step + 2}"])
    assert checkpoint.load(out)["step"] == step + 2
    assert max(train_losses(out)) == step + 2
