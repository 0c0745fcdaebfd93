"""The pre-training loop: accumulation, exact resume, signals, atomic checkpoints, precision, clipping, monitoring,
configuration errors and a real run on the built-in corpus."""

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

from model import GPT, GPTConfig
from tests.conftest import TINY_ARGS
from train import main
from training import checkpoint
from training.config import parse_args
from training.loop import TrainingError, accumulate_gradients, apply_update, clip_gradients, unscale_gradients
from training.stages.pretrain import LanguageModeling

ROOT = Path(__file__).resolve().parent.parent


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}


def small_model(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def batch(b: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (b, 17), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


# ----------------------------------------------------------------------------------------------- step maths
def test_grad_accumulation_equals_one_large_batch():
    big = batch(4, 0)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads, params = [], []
    for batches in ([big], halves):
        model = small_model()
        count = sum(LanguageModeling().count(b) for b in batches).float()
        accumulate_gradients(model, LanguageModeling(), batches, count, 1, torch.autocast("cpu", enabled=False),
                             scaler, "ddp")
        grads.append([p.grad.clone() for p in model.parameters()])
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture
def gloo_world_of_one():
    """A real gloo process group of world size 1 in this process, so DDP and FSDP2 wrap a model with their reducer
    and hooks without launching workers; torn down again, since the trainer's helpers look at dist.is_initialized."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_wrapped_grad_accumulation_syncs_only_on_the_last_micro_step(gloo_world_of_one, strategy):
    """4 micro-steps through a DDP / FSDP2 model: no gradient communication until the last backward (DDP: its
    reducer calls no comm hook; FSDP2: the sharded parameters get no .grad, as the reduce-scatter sets it), and the
    result equals one large batch on the plain model."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    big = batch(4, 0)
    micro = [{k: v[i:i + 1] for k, v in big.items()} for i in range(4)]
    scaler, no_autocast = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
    lm = LanguageModeling()
    plain = small_model()
    accumulate_gradients(plain, lm, [big], lm.count(big).float(), 1, no_autocast, scaler, strategy)

    model = small_model()
    if strategy == "ddp":
        model, reductions = DDP(model), [0]

        def counting_hook(state, bucket):
            reductions[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        synced = lambda: reductions[0]  # noqa: E731
    else:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        synced = lambda: sum(p.grad is not None for p in model.parameters())  # noqa: E731
    seen = []  # before each micro-step's forward (= after the previous backward), then after the last backward

    def observed(m, b):
        seen.append(synced())
        return lm(m, b)

    count = sum(lm.count(b) for b in micro).float()
    accumulate_gradients(model, observed, micro, count, 1, no_autocast, scaler, strategy)
    seen.append(synced())
    n_params = len(list(model.parameters()))
    assert seen == [0, 0, 0, 0, 1 if strategy == "ddp" else n_params], seen  # one DDP bucket for this small model
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_clipping_caps_applied_norm_and_reports_pre_clip_norm():
    model = small_model()
    b = batch(4, 1)
    (LanguageModeling()(model, b)[0] * 100).backward()  # large gradients
    params = list(model.parameters())
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    norm = clip_gradients(params, 0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5) and norm.item() > 0.5
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    assert after.item() <= 0.5 * (1 + 1e-5)


def test_fp16_scaler_skips_a_step_with_inf_gradient_and_leaves_parameters():
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(LanguageModeling()(model, batch(2, 2))[0]).backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    unscale_gradients(opt, scaler)
    clip_gradients(list(model.parameters()), 1.0)
    assert apply_update(opt, scaler) is True
    assert scaler.get_scale() == 512.0
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not opt.state  # no moments were touched
    # The next, finite step goes through.
    opt.zero_grad()
    scaler.scale(LanguageModeling()(model, batch(2, 3))[0]).backward()
    unscale_gradients(opt, scaler)
    clip_gradients(list(model.parameters()), 1.0)
    assert apply_update(opt, scaler) is False
    assert not torch.equal(before[0], next(model.parameters()))


# ----------------------------------------------------------------------------------------------- runs
def run_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), *TINY_ARGS, "--log.interval=1", "--eval.interval=0",
            *extra]


def test_exact_resume_is_bitwise(tmp_path, corpus_dir):
    common = ["--train.max_steps=20", "--model.dropout=0.1", "--ckpt.interval=100", "--train.batch_size=8"]
    main(run_args(corpus_dir, tmp_path / "full", *common))
    main(run_args(corpus_dir, tmp_path / "split", *common, "--train.stop_after_steps=10"))
    stopped = train_losses(tmp_path / "split")
    assert max(stopped) == 10 and checkpoint.latest(tmp_path / "split").name == "step_00000010.pt"
    main(["--out", str(tmp_path / "split"), "--resume"])
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(full) == sorted(resumed) == list(range(1, 21))
    assert all(full[s] == resumed[s] for s in full), [(s, full[s], resumed[s]) for s in full if full[s] != resumed[s]]
    # The end states agree too.
    a = torch.load(checkpoint.latest(tmp_path / "full"), weights_only=True)["model"]
    b = torch.load(checkpoint.latest(tmp_path / "split"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_resume_continues_exactly(tmp_path, corpus_dir):
    common = ["--train.max_steps=40", "--ckpt.interval=1000", "--train.batch_size=8", "--model.dropout=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *run_args(corpus_dir, out, *common)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        if (out / "metrics.jsonl").exists() and len(train_losses(out)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output
    ckpt = checkpoint.latest(out)
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert 3 <= stopped_at < 40
    main(["--out", str(out), "--resume"])
    main(run_args(corpus_dir, tmp_path / "straight", *common))
    full, resumed = train_losses(tmp_path / "straight"), train_losses(out)
    assert sorted(resumed) == list(range(1, 41))
    assert all(full[s] == resumed[s] for s in full)


def test_partial_checkpoint_is_ignored(tmp_path, corpus_dir):
    out = tmp_path / "run"
    main(run_args(corpus_dir, out, "--train.max_steps=4", "--ckpt.interval=2", "--ckpt.keep=3"))
    ckdir = out / checkpoint.CKPT_DIR
    assert [p.name for p in sorted(ckdir.glob("step_*.pt"))] == ["step_00000002.pt", "step_00000004.pt"]
    # A save killed mid-write: a truncated temporary file of the next checkpoint, pointer untouched.
    good = (ckdir / "step_00000004.pt").read_bytes()
    (ckdir / "step_00000006.pt.tmp").write_bytes(good[: len(good) // 3])
    assert checkpoint.latest(out).name == "step_00000004.pt"
    assert checkpoint.load(out)["step"] == 4
    # Resuming continues from step 4 and cleans the stray file up at its next save.
    main(["--out", str(out), "--resume", "--train.max_steps=6"])
    assert checkpoint.load(out)["step"] == 6
    assert not list(ckdir.glob("*.tmp"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "nan"
    monkeypatch.setenv("GPTRAIN_FAULT", "nan_loss@5")
    with pytest.raises(TrainingError, match="non-finite loss .* at step 5"):
        main(run_args(corpus_dir, out, "--train.max_steps=8", "--ckpt.interval=3"))
    assert checkpoint.load(out)["step"] == 3
    monkeypatch.setenv("GPTRAIN_FAULT", "inf_grad@2")
    with pytest.raises(TrainingError, match="non-finite gradient norm"):
        main(run_args(corpus_dir, tmp_path / "inf", "--train.max_steps=4"))


def test_fp16_run_counts_skipped_step_without_advancing_schedule(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setenv("GPTRAIN_FAULT", "inf_grad@2")
    out = tmp_path / "fp16"
    summary = main(run_args(corpus_dir, out, "--train.precision=fp16", "--train.max_steps=5", "--model.n_layer=1",
                            "--train.batch_size=2", "--model.block_size=32", "--train.warmup_steps=3",
                            "--train.schedule=wsd", "--train.decay_frac=0.4", "--train.min_lr_ratio=0.1"))
    # max_steps counts applied updates: the skipped step 2 is attempted again, so 5 updates take 6 steps
    assert (summary["skipped_steps"], summary["step"], summary["max_steps"]) == (1, 6, 5)
    rows = {r["step"]: r for r in read_metrics(out) if "train/lr" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    # Step 2 was skipped, so step 3 reuses step 2's learning rate: warmup 1/3, 2/3, 2/3, 3/3 of the peak 3e-3, then
    # the decay (its last 2 of 5 updates) halfway to the floor 3e-4 and onto it: the last update runs at the floor
    lrs = [rows[s]["train/lr"] for s in range(1, 7)]
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3, 3e-3, 1.65e-3, 3e-4])
    ck = checkpoint.load(out)
    assert ck["skipped_steps"] == 1 and ck["sched_step"] == 5 and ck["step"] == 6 and ck["scaler"] is not None


def test_block_grad_norms_are_logged_before_clipping(tmp_path, corpus_dir):
    """grad_norm/<block> is measured where train/grad_norm is, before clipping: every parameter sits in one block's
    group, so the squared block norms sum to the squared global norm, although clipping to 0.001 scales the applied
    gradients far below it."""
    out = tmp_path / "health"
    main(run_args(corpus_dir, out, "--train.max_steps=2", "--train.grad_clip=0.001", "--log.health_interval=1",
                  "--log.hist_interval=0", "--model.n_layer=1", "--train.batch_size=2"))
    rows = read_metrics(out)
    for step in (1, 2):
        total = next(r["train/grad_norm"] for r in rows if r["step"] == step and "train/grad_norm" in r)
        blocks = {k: v for r in rows if r["step"] == step for k, v in r.items() if k.startswith("grad_norm/")}
        assert set(blocks) == {"grad_norm/block_0", "grad_norm/embedding", "grad_norm/final_norm"}, blocks
        assert total > 100 * 0.001  # clipping changed the gradients a lot
        assert sum(v * v for v in blocks.values()) == pytest.approx(total ** 2, rel=1e-5)


def test_step_flops_by_hand():
    """A step's model FLOPs sum each micro-batch's tokens at its own length T (model/gpt.py's 6N + 12 L d T); a live
    DPO reference adds its forward pass (2N + 4 L d T). N = 1232 matmul weights, L d = 2 x 8 (tests/test_model.py)."""
    from training.monitor import step_flops

    model = GPT(GPTConfig(vocab_size=10, block_size=6, n_layer=2, n_head=2, n_kv_head=1, n_embd=8, mlp_ratio=2.0))
    ids = lambda b, t: torch.zeros(b, t, dtype=torch.long)  # noqa: E731
    # SFT micro-batches padded to 4 and to 6 tokens: 2 x 4 x (7392 + 768) + 3 x 6 x (7392 + 1152)
    sft = [{"input_ids": ids(2, 4), "labels": ids(2, 4)}, {"input_ids": ids(3, 6), "labels": ids(3, 6)}]
    assert step_flops(model, sft) == 2 * 4 * 8160 + 3 * 6 * 8544 == 219072
    # a DPO pair batch of width 5, chosen and rejected: 20 tokens x (7392 + 960), plus the reference's 2464 + 320
    dpo = [{"chosen_input_ids": ids(2, 5), "rejected_input_ids": ids(2, 5), "chosen_labels": ids(2, 5)}]
    pair = ("chosen_input_ids", "rejected_input_ids")
    assert step_flops(model, dpo, input_keys=pair) == 20 * 8352 == 167040
    assert step_flops(model, dpo, reference_forward=True, input_keys=pair) == 20 * (8352 + 2784) == 222720


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_mfu_counts_the_padded_length_of_fine_tuning_batches(tiny_run, tmp_path, stage):
    """SFT and DPO pad a batch to its longest example, not to block_size: train/mfu counts FLOPs at that length T
    (6N + 12 L d T per token; DPO adds the live reference's forward, 2N + 4 L d T). With one record per step,
    mfu x peak / tokens_per_sec is the FLOPs per token of the step's T, and T = the step's tokens / its rows."""
    out, peak = tmp_path / stage, 1e9
    main(["--stage", stage, "--init-from", str(tiny_run), "--out", str(out), "--train.max_steps=3",
          "--train.batch_size=2", "--data.synthetic_train=64", "--data.synthetic_val=4", "--eval.interval=0",
          "--log.interval=1", f"--train.peak_flops={peak:g}", "--log.tensorboard=false", "--eval.sample_tokens=1",
          "--log.health_interval=0", "--log.hist_interval=0"])
    model = GPT(GPTConfig.from_dict(checkpoint.load(out)["model_config"]))
    rows_per_step = 2 * (2 if stage == "dpo" else 1)  # batch 2; a DPO pair is a chosen and a rejected row
    seen, lengths = 0, []
    for r in sorted((r for r in read_metrics(out) if "train/mfu" in r), key=lambda r: r["step"]):
        T = round((r["train/tokens_seen"] - seen) / rows_per_step)
        assert T * rows_per_step == r["train/tokens_seen"] - seen
        seen = r["train/tokens_seen"]
        per_token = model.flops_per_token(T) + (model.flops_per_token(T, forward_only=True) if stage == "dpo" else 0)
        assert r["train/mfu"] * peak / r["train/tokens_per_sec"] == pytest.approx(per_token, rel=1e-9), (r, T)
        lengths.append(T)
    assert len(lengths) == 3 and max(lengths) < model.cfg.block_size, lengths  # the rows were padded short


def test_bf16_autocast_runs_on_cpu(tmp_path, corpus_dir):
    summary = main(run_args(corpus_dir, tmp_path / "bf16", "--train.precision=bf16", "--train.max_steps=3",
                            "--model.n_layer=1", "--train.batch_size=2", "--model.block_size=32"))
    losses = train_losses(tmp_path / "bf16")
    assert summary["step"] == 3 and all(math.isfinite(v) for v in losses.values())


def test_tensorboard_events_match_metrics_jsonl(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
                "train/tokens_seen", "val/loss", "val/bpb", "grad_norm/block_0", "grad_norm/embedding",
                "update_ratio/matrices", "update_ratio/vectors"):
        assert tag in tags, (tag, sorted(tags))
    hist_tags = set(acc.Tags()["histograms"])
    assert {"weights/blocks.0.attn.q_proj.weight", "activations/block_1"} <= hist_tags, sorted(hist_tags)[:5]
    text_tags = set(acc.Tags()["tensors"])
    assert {"config/text_summary", "sample/text_summary"} <= text_tags, text_tags
    rows = read_metrics(tiny_run)
    compared = 0
    for tag in ("train/loss", "train/lr", "val/loss", "val/bpb", "grad_norm/block_1"):
        jsonl = {r["step"]: r[tag] for r in rows if tag in r}
        events = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(jsonl) == set(events), tag
        for s, v in jsonl.items():
            assert events[s] == pytest.approx(v, rel=1e-6)
            compared += 1
    assert compared > 20


def test_default_corpus_run_lowers_validation_loss(tmp_path):
    """A short real run on the built-in stdlib corpus (small vocab to keep tokenizer training quick)."""
    out = tmp_path / "stdlib"
    summary = main(["--out", str(out), "--model.vocab_size=512", "--data.tokenizer_max_mb=1", "--model.n_layer=2",
                    "--model.n_embd=64", "--model.block_size=64", "--train.batch_size=16", "--train.max_steps=60",
                    "--train.warmup_steps=10", "--eval.interval=30", "--eval.max_tokens=8192",
                    "--eval.sample_tokens=8"])
    assert summary["val"]["loss"] < summary["first_val"]["loss"] - 1.0
    manifest = json.loads(next((Path(os.environ["GPTRAIN_CACHE"]) / "shards").glob("stdlib-*/manifest.json")).read_text())
    assert manifest["python_version"] == sys.version.split()[0]
    run_files = {p.name for p in out.iterdir()}
    assert {"config.toml", "tokenizer.json", "env.json", "metrics.jsonl", "checkpoints"} <= run_files
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert env["git_revision"]


def test_lr_schedules_by_hand():
    from training.config import TrainSection
    from training.optim import lr_factor, wsd_decay_start

    wsd = TrainSection(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_frac=0.3)
    assert wsd_decay_start(100, wsd) == 70
    assert [lr_factor(s, 100, wsd) for s in (0, 9, 10, 69)] == [pytest.approx(0.1), 1.0, 1.0, 1.0]
    assert lr_factor(70, 100, wsd) == pytest.approx(1 - 0.9 / 30) and lr_factor(99, 100, wsd) == pytest.approx(0.1)
    cos = TrainSection(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    # the cosine runs over steps 10..99 with progress (step - 9) / 90: half-way at step 54, the floor at step 99,
    # the last applied update (it used to reach the floor only at step 100, which never runs)
    assert lr_factor(9, 100, cos) == 1.0 and lr_factor(54, 100, cos) == pytest.approx(0.55)
    assert lr_factor(10, 100, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 90)))
    assert lr_factor(99, 100, cos) == pytest.approx(0.1, abs=1e-12)


def test_budget_replanning_moves_only_the_start_of_the_decay():
    from training.budget import replan_budget_steps
    from training.config import TrainSection

    t = TrainSection(warmup_steps=10, schedule="wsd", decay_frac=0.3)
    # 500 steps done, 500 s left at 0.2 s/step: 2500 more; the decay (900 steps) starts at 2100, still ahead
    assert replan_budget_steps(500, 500.0, 0.2, t) == 3000
    # 2000 done, 20 s left: 2100 would put the decay's start at 1470, behind us. The decay starts at the next step
    # instead: the smallest m with m - round(0.3 m) >= 2000 is 2857 (2857 - 857); 2856 - 857 = 1999
    assert replan_budget_steps(2000, 20.0, 0.2, t) == 2857
    # over budget already: the same rule (143 - 43 = 100)
    assert replan_budget_steps(100, -5.0, 0.2, t) == 143
    # the count is of applied updates, as max_steps is: 100 steps with 3 fp16-skipped ones applied 97 updates; 10 s at
    # 0.2 s/step buy 50 more, 147 in all (counting from the 100 attempted steps would give 150, three too many)
    assert replan_budget_steps(97, 10.0, 0.2, t) == 147
    # ... and the decay-start rule reads the updates: 138 (138 - 41 = 97; 137 - 41 = 96)
    assert replan_budget_steps(97, -5.0, 0.2, t) == 138
    # a decay over every step after the warmup has no flat part to protect: the plain count (it used to hang)
    assert replan_budget_steps(40, 1.0, 0.1, TrainSection(warmup_steps=35, decay_frac=1.0)) == 50


def test_time_budget_object_plans_and_replans_from_the_times_it_is_fed(capsys):
    """training/budget.py alone, on a fake clock (binary fractions, so the arithmetic is exact): step 1 untimed,
    then 0.125 s a step; the validations' share is added to the first plan only; re-plans every 30 steps while
    wsd's lr is flat, none once it decays."""
    from training.budget import TimeBudget
    from training.config import TrainSection

    t = TrainSection(time_budget_min=1.0, schedule="wsd", warmup_steps=0, decay_frac=0.5)
    budget = TimeBudget(t, eval_interval=10)
    budget.validation_took(1.25)  # 0.125 s per step over 10 steps
    assert budget.after_step(1, 1, None, now=10.0, elapsed=12.0) is None  # the window starts after step 1
    assert budget.after_step(30, 30, None, now=13.5, elapsed=15.5) is None  # not yet 30 timed steps
    # 30 steps in 3.75 s: 0.125 + 0.125 s a step, 60 - 15 = 45 s left: 180 more updates after the 31 applied
    assert budget.after_step(31, 31, None, now=13.75, elapsed=15.75 - 0.75) == 211
    assert "time budget 1 min: 125.0 ms/step -> max_steps=211" in capsys.readouterr().out
    # the machine slows down: 60 steps in 15 s (0.25 s a step over the window), 60 - 27 = 33 s left: 132 more
    assert budget.after_step(61, 61, 211, now=25.0, elapsed=27.0) == 61 + 132
    assert "time budget: 250.0 ms/step so far -> max_steps=193 (was 211; the decay starts at step 97)" in \
        capsys.readouterr().out
    assert budget.after_step(62, 62, 193, now=25.25, elapsed=27.25) == 193  # between re-plans: unchanged
    # past the start of the decay (step 97) the count is fixed, however slow the machine
    assert budget.after_step(121, 121, 193, now=90.0, elapsed=92.0) == 193


def test_time_budget_is_replanned_when_the_machine_slows_down(tmp_path, corpus_dir, monkeypatch, capsys):
    # From step 32 every step takes 100 ms longer (the trainer's fault hook sleeps): the plan made after the timing
    # window (steps 2-31) no longer fits the budget, and is cut at the next re-plan (step 61), the lr still flat
    monkeypatch.setenv("GPTRAIN_FAULT", "slow@32")
    out = tmp_path / "slow"
    summary = main(run_args(corpus_dir, out, "--train.time_budget_min=0.15", "--train.batch_size=4",
                            "--train.warmup_steps=5", "--train.min_lr_ratio=0.1"))
    log = capsys.readouterr().out
    first = int(log.split("time budget 0.15 min: ")[1].split("max_steps=")[1].split()[0])
    assert summary["max_steps"] == summary["step"] == checkpoint.load(out)["max_steps"] < first
    assert f"-> max_steps={summary['max_steps']} (was " in log  # the re-plan that fixed the count, printed
    # the schedule kept its shape: warmup, flat, then one linear ramp down to the floor ending at the last step
    lrs = [r["train/lr"] for r in sorted(read_metrics(out), key=lambda r: r["step"]) if "train/lr" in r]
    peak, n = 3e-3, len(lrs)
    assert n == summary["max_steps"] and lrs[-1] == pytest.approx(0.1 * peak)
    ramp = [i for i, lr in enumerate(lrs) if i >= 5 and lr < peak - 1e-12]
    assert ramp == list(range(ramp[0], n))  # once it starts falling it never returns to the peak
    steps = [lrs[i - 1] - lrs[i] for i in ramp[1:]]
    assert max(steps) == pytest.approx(min(steps), rel=1e-6)  # equal decrements: no jump
    assert n - ramp[0] == round(0.3 * n)


def test_time_budget_becomes_a_saved_step_count(tmp_path, corpus_dir):
    out = tmp_path / "budget"
    summary = main(run_args(corpus_dir, out, "--train.time_budget_min=0.04", "--train.batch_size=4"))
    ck = checkpoint.load(out)
    assert summary["max_steps"] == ck["max_steps"] == ck["step"] >= 31  # at least the timing window
    # Resumed with another step limit on the command line, the saved count still rules.
    cfg = parse_args(["--out", str(out), "--resume", "--train.stop_after_steps=3"])
    assert cfg.train.time_budget_min == 0.04
    # Interrupted before the timing window ended: the resumed run times its own window, then plans the count.
    early = tmp_path / "early"
    main(run_args(corpus_dir, early, "--train.time_budget_min=0.04", "--train.batch_size=4",
                  "--train.stop_after_steps=3"))
    assert checkpoint.load(early)["max_steps"] is None
    summary = main(["--out", str(early), "--resume"])
    assert summary["max_steps"] == checkpoint.load(early)["max_steps"] == checkpoint.load(early)["step"] >= 3 + 1 + 30


def test_a_moved_run_folder_resumes(tmp_path, corpus_dir):
    import shutil

    main(run_args(corpus_dir, tmp_path / "a", "--train.max_steps=4", "--train.stop_after_steps=2"))
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert main(["--out", str(tmp_path / "b"), "--resume"])["step"] == 4


# ----------------------------------------------------------------------------------------------- refusals
def test_existing_run_folder_is_not_overwritten(tiny_run, corpus_dir):
    before = sorted(p.name for p in (tiny_run / checkpoint.CKPT_DIR).iterdir())
    with pytest.raises(ValueError, match="already holds a run"):
        main(run_args(corpus_dir, tiny_run, "--train.max_steps=2"))
    assert sorted(p.name for p in (tiny_run / checkpoint.CKPT_DIR).iterdir()) == before


def test_resume_refuses_shape_and_setting_changes(tmp_path, corpus_dir):
    out = tmp_path / "r"
    main(run_args(corpus_dir, out, "--train.max_steps=2"))
    with pytest.raises(ValueError, match=r"model.n_layer was 2 in the saved run but is 3 now"):
        main(["--out", str(out), "--resume", "--model.n_layer=3"])
    with pytest.raises(ValueError, match=r"train.lr was 0.003 .* is 0.01 now"):
        main(["--out", str(out), "--resume", "--train.lr=0.01"])
    with pytest.raises(ValueError, match="no complete checkpoint"):
        main(["--out", str(tmp_path / "empty"), "--resume"])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option --train.lrr .*did you mean 'train.lr'"):
        parse_args(["--train.lrr=3"])
    with pytest.raises(ValueError, match=r"eval.interval=-5 must be >= 0 \(0 = off\)"):
        parse_args(["--eval.interval=-5"])
    with pytest.raises(ValueError, match=r"--train.max_steps='ten': expected int"):
        parse_args(["--train.max_steps=ten"])
    with pytest.raises(ValueError, match=r"train.precision='fp8': expected one of"):
        parse_args(["--train.precision=fp8"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nbatch_sise = 4\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key 'train.batch_sise' \(did you mean 'train.batch_size'"):
        parse_args(["--config", str(bad)])
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ValueError, match=r"'train.lr': expected float"):
        parse_args(["--config", str(wrong)])
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlr = 1\n")
    with pytest.raises(ValueError, match="broken.toml: invalid TOML"):
        parse_args(["--config", str(broken)])
    good = tmp_path / "good.toml"
    good.write_text('stage = "pretrain"\n[train]\nlr = 1\nbatch_size = 4\n[model]\npreset = "small"\n')
    cfg = parse_args(["--config", str(good), "--train.batch_size=8"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.model.preset) == (1.0, 8, "small")


def test_compiled_and_eager_checkpoints_load_into_each_other(tmp_path, corpus_dir):
    """eager steps 1-2 -> resume compiled for 3-4 -> resume eager for 5-6; losses track a straight eager run."""
    tiny = ["--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
            "--train.batch_size=4", "--train.max_steps=6"]
    main(run_args(corpus_dir, tmp_path / "eager", *tiny))
    out = tmp_path / "mixed"
    main(run_args(corpus_dir, out, *tiny, "--train.stop_after_steps=2"))
    main(["--out", str(out), "--resume", "--train.compile=true", "--train.stop_after_steps=4"])
    sd = torch.load(checkpoint.latest(out), weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in sd)  # saved without the compile wrapper's prefix
    main(["--out", str(out), "--resume", "--train.compile=false"])
    eager, mixed = train_losses(tmp_path / "eager"), train_losses(out)
    assert sorted(mixed) == list(range(1, 7))
    for s in range(1, 7):
        assert mixed[s] == pytest.approx(eager[s], rel=1e-4), (s, mixed[s], eager[s])


def test_muon_orthogonalizes_and_resumes_exactly(tmp_path, corpus_dir):
    from training.optim import orthogonalize

    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3  # singular values pushed towards 1 (quintic NS, not exact)
    s_tall = torch.linalg.svdvals(orthogonalize(g.T))
    assert s_tall.min() > 0.5 and s_tall.max() < 1.3
    stack = torch.randn(3, 32, 96, generator=torch.Generator().manual_seed(1))  # batched = one matrix at a time
    torch.testing.assert_close(orthogonalize(stack), torch.stack([orthogonalize(m) for m in stack]))
    torch.testing.assert_close(orthogonalize(stack.mT), torch.stack([orthogonalize(m.T) for m in stack]))
    common = ["--train.optimizer=muon", "--train.max_steps=6", "--model.dropout=0.1", "--train.batch_size=4"]
    main(run_args(corpus_dir, tmp_path / "full", *common))
    main(run_args(corpus_dir, tmp_path / "split", *common, "--train.stop_after_steps=3"))
    main(["--out", str(tmp_path / "split"), "--resume"])
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 7)) and all(full[k] == resumed[k] for k in full)
    assert full[6] < full[1]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_weight_decay_applies_where_documented(optimizer, arch):
    """train.weight_decay's rule (training/config.py): adamw decays every 2-D weight; muon only the embeddings and an
    untied head (its AdamW part, at train.lr), not the blocks' Muon matrices; norms and biases never. With zero
    gradients a step changes a weight by its decoupled decay alone: x (1 - lr x weight_decay)."""
    from training.config import TrainSection
    from training.optim import build_optimizer

    gpt2 = arch == "gpt2"
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8, arch=arch, bias=gpt2,
                          tie_embeddings=not gpt2))
    opt = build_optimizer(model, TrainSection(optimizer=optimizer, lr=0.01, muon_lr=0.02, weight_decay=0.1), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    mlp = ("up_proj", "down_proj") if gpt2 else ("gate_proj", "up_proj", "down_proj")
    block_matrices = {f"blocks.0.attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} | \
        {f"blocks.0.mlp.{m}.weight" for m in mlp}
    decayed = {"wte.weight"} | ({"wpe.weight", "lm_head.weight"} if gpt2 else set()) | \
        (block_matrices if optimizer == "adamw" else set())
    for name, p in model.named_parameters():
        factor = 1 - 0.01 * 0.1 if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name)
