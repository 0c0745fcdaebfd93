"""The optimizer options of the speedrun candidates (issue 16), each off by default: NorMuon (train.normuon), cautious
weight decay (train.cautious_decay), decoupled decay on the Muon matrices (train.muon_weight_decay) and the
weight decay falling linearly to 0 (train.wd_schedule). Single steps on tiny tensors against a reference
written out here, exact resume with the options on, and the refusals."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from tests.conftest import TINY_ARGS, assert_resumes_exactly
from train import main
from training import checkpoint
from training.config import TrainSection, parse_args
from training.distributed import DistInfo
from training.loop import check_settings
from training.optim import Muon, build_optimizer, orthogonalize, set_lr, weight_decay_factor

EPS = 1e-8


def muon_group(p: torch.Tensor, lr: float, wd: float = 0.0) -> dict:
    return {"params": [p], "muon": True, "lr": lr, "peak_lr": lr, "weight_decay": wd, "name": "muon"}


def step_with(opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> None:
    p.grad = grad.clone()
    opt.step()


def reference_normuon_update(o: torch.Tensor, v: list[float], beta2: float) -> torch.Tensor:
    """NorMuon's row normalisation written out row by row: v_i <- beta2 v_i + (1 - beta2) mean_j o_ij^2 (v updated in
    place), row i divided by sqrt(v_i) + eps, the whole rescaled to o's Frobenius norm."""
    rows = []
    for i in range(o.shape[0]):
        v[i] = beta2 * v[i] + (1 - beta2) * sum(x * x for x in o[i].tolist()) / o.shape[1]
        rows.append([x / (v[i] ** 0.5 + EPS) for x in o[i].tolist()])
    normed = torch.tensor(rows, dtype=torch.float64)
    return normed * (o.double().norm() / normed.norm())


@pytest.mark.parametrize("shape", [(3, 5), (6, 2)])
def test_normuon_two_steps_by_hand(shape):
    """Two NorMuon steps on one matrix (wide, and tall: the sqrt(rows / cols) scale) against the reference, with the
    Nesterov momentum of the project's Muon; the orthogonalisation is Muon's own (tested in test_train.py)."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen)
    g1, g2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lr, mu, beta2 = 0.02, 0.95, 0.9
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    p = p0.clone()
    opt = Muon([muon_group(p, lr)], momentum=mu, normuon_beta2=beta2)

    step_with(opt, p, g1)
    o1 = orthogonalize(g1 + mu * g1)  # Nesterov: buf = g1, update = g1 + mu buf
    # After one step every row of the normalised update has the same RMS (v is each row's own mean square, times
    # 1 - beta2), so each row of the step has norm ||o1||_F / sqrt(rows) x lr x scale: no reference needed.
    row_norms = (p0 - p).norm(dim=1) / (lr * scale)
    torch.testing.assert_close(row_norms, torch.full((shape[0],), (o1.norm() / shape[0] ** 0.5).item()),
                               rtol=1e-5, atol=0)
    v = [0.0] * shape[0]
    p_ref = p0.double() - lr * scale * reference_normuon_update(o1, v, beta2)
    torch.testing.assert_close(p.double(), p_ref, rtol=0, atol=1e-6)

    step_with(opt, p, g2)
    buf = mu * g1 + g2
    o2 = orthogonalize(g2 + mu * buf)
    p_ref = p_ref - lr * scale * reference_normuon_update(o2, v, beta2)
    torch.testing.assert_close(p.double(), p_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["row_mean_square"].double().flatten(), torch.tensor(v, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    # ... and differs from plain Muon (whose rows are not balanced) by far more than that tolerance
    plain = p0.clone()
    muon = Muon([muon_group(plain, lr)], momentum=mu)
    step_with(muon, plain, g1)
    step_with(muon, plain, g2)
    torch.testing.assert_close(plain, p0 - lr * scale * (o1 + o2), rtol=0, atol=1e-6)
    assert (plain - p).abs().max() > 1e-4  # 100 x the tolerance above


def test_cautious_decay_adamw_by_hand():
    """One AdamW step (train.optimizer=adamw): m_hat = g, v_hat = g^2, so the update is u = g / (|g| + eps) and
    w <- w - lr (u + wd 1[u w >= 0] w). Weights (1, -1, 2, -2, 3), gradients (1, 1, -1, -1, 0), lr 0.1, wd 0.5: the
    decay (0.05 w) applies at 0 (same signs), 3 (same signs) and 4 (u = 0), not at 1 and 2."""
    u = 1 / (1 + EPS)
    expected = {True: [1 - 0.1 * (u + 0.5), -1 - 0.1 * u, 2 + 0.1 * u, -2 - 0.1 * (-u - 1.0), 3 - 0.1 * 1.5],
                False: [1 - 0.1 * (u + 0.5), -1 - 0.1 * (u - 0.5), 2 - 0.1 * (-u + 1.0), -2 - 0.1 * (-u - 1.0),
                        3 - 0.1 * 1.5]}
    for cautious, want in expected.items():
        model = torch.nn.Linear(5, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, -2.0, 3.0]]))
        opt = build_optimizer(model, TrainSection(optimizer="adamw", lr=0.1, weight_decay=0.5,
                                                  cautious_decay=cautious), "cpu")
        assert isinstance(opt, Muon) == cautious  # torch's AdamW has no decay mask: Muon's AdamW path
        set_lr(opt, 1.0)
        step_with(opt, model.weight, torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0]]))
        torch.testing.assert_close(model.weight.detach(), torch.tensor([want]), rtol=0, atol=1e-6, msg=str(cautious))


def test_cautious_decay_on_muon_matrices_by_hand():
    """The Muon matrices with train.muon_weight_decay: w <- w - lr wd 1[o w >= 0] w - lr scale o, o the orthogonalised
    Nesterov momentum (the update's sign), on a 4 x 3 matrix (tall: scale sqrt(4/3)); without caution every entry
    decays."""
    gen = torch.Generator().manual_seed(1)
    p0, g = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    lr, wd, scale = 0.05, 0.4, (4 / 3) ** 0.5
    o = orthogonalize(1.95 * g)
    mask = (o * p0 >= 0).double()
    assert 0 < mask.sum() < mask.numel()  # the seed gives both kinds of coordinates
    for cautious, decayed in ((True, mask), (False, torch.ones_like(mask))):
        p = p0.clone()
        opt = Muon([muon_group(p, lr, wd)], momentum=0.95, cautious=cautious)
        step_with(opt, p, g)
        want = p0.double() - lr * wd * decayed * p0.double() - lr * scale * o.double()
        torch.testing.assert_close(p.double(), want, rtol=0, atol=1e-6)


def test_build_optimizer_wires_the_options():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = build_optimizer(model, TrainSection(optimizer="muon", normuon=True, beta2=0.9,
                                              cautious_decay=True, muon_weight_decay=0.2), "cpu")
    assert (opt.normuon_beta2, opt.cautious) == (0.9, True)
    groups = {g["name"]: (g["weight_decay"], g["peak_weight_decay"]) for g in opt.param_groups}
    assert groups == {"muon": (0.2, 0.2), "matrices": (0.1, 0.1), "vectors": (0.0, 0.0)}
    default = build_optimizer(model, parse_args([]).train, "cpu")  # the default recipe: all off
    assert (default.normuon_beta2, default.cautious) == (None, False)
    assert {g["name"]: g["weight_decay"] for g in default.param_groups}["muon"] == 0.0


def test_wd_schedule_by_hand():
    """linear: factor 1 - (step + 1) / max_steps (0 at the last update); set_lr scales each group's peak decay. With
    zero gradients a torch AdamW step multiplies a matrix by 1 - lr x wd: here 1 - (0.5 x 0.01) x (0.25 x 0.1)."""
    linear, constant = TrainSection(wd_schedule="linear"), TrainSection()
    assert [weight_decay_factor(s, 4, linear) for s in range(4)] == [0.75, 0.5, 0.25, 0.0]
    assert [weight_decay_factor(s, 4, constant) for s in range(4)] == [1.0] * 4
    model = torch.nn.Linear(3, 2, bias=False)
    before = model.weight.detach().clone()
    opt = build_optimizer(model, TrainSection(optimizer="adamw", lr=0.01, weight_decay=0.1), "cpu")
    set_lr(opt, 0.5, weight_decay_factor(2, 4, linear))
    assert [(g["weight_decay"], g["peak_weight_decay"]) for g in opt.param_groups] == [(0.025, 0.1), (0.0, 0.0)]
    step_with(opt, model.weight, torch.zeros_like(model.weight))
    torch.testing.assert_close(model.weight.detach(), before * (1 - 0.005 * 0.025), rtol=1e-7, atol=0)
    set_lr(opt, 1.0)  # the peak stays recorded: back to the full decay
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_options_that_need_muon_or_a_range_are_refused():
    for flags, words in ((["--train.optimizer=adamw", "--train.normuon=true"], "train.normuon=True applies"),
                         (["--train.optimizer=adamw", "--train.muon_weight_decay=0.1"], "train.muon_weight_decay=0.1"),
                         (["--train.beta2=1.0"], "train.beta2=1.0 must be in [0, 1)"),
                         (["--train.muon_weight_decay=-0.1"], "train.muon_weight_decay=-0.1"),
                         (["--train.wd_schedule=cosine"], "cosine")):
        with pytest.raises(ValueError) as e:
            parse_args(flags)
        assert words in str(e.value), (flags, str(e.value))


@pytest.mark.parametrize("flags, refused", [(["--train.optimizer=muon", "--train.normuon=true"],
                                             "whole gradient matrices (and --train.normuon=true whole rows"),
                                            (["--train.optimizer=muon"], "muon needs whole gradient matrices;"),
                                            (["--train.optimizer=adamw", "--train.cautious_decay=true"],
                                             "cautious_decay=true")])
def test_fsdp_refuses_normuon_and_cautious_decay(flags, refused):
    """Under FSDP2 the parameters are shards (DTensors): Muon cannot orthogonalise a shard, NorMuon's row statistics
    would be a shard's, and cautious decay's optimizer has not been run on DTensors. One process is not refused.
    NorMuon runs only inside Muon (the config refuses it with adamw), so its refusal is Muon's, naming it."""
    cfg = parse_args(["--dist.strategy=fsdp", *flags])
    check_settings(cfg, DistInfo(world_size=1), "fp32")
    with pytest.raises(ValueError, match="not supported with --dist.strategy=fsdp") as e:
        check_settings(cfg, DistInfo(world_size=2), "fp32")
    assert refused in str(e.value)


def run_args(corpus, out, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), *TINY_ARGS, "--log.interval=1", "--eval.interval=0",
            "--train.max_steps=6", "--train.batch_size=4", "--model.dropout=0.1", "--train.warmup_steps=2", *extra]


@pytest.mark.parametrize("options", [
    ["--train.optimizer=muon", "--train.normuon=true", "--train.cautious_decay=true",
     "--train.muon_weight_decay=0.05", "--train.wd_schedule=linear"],
    ["--train.optimizer=adamw", "--train.cautious_decay=true", "--train.wd_schedule=linear"],
], ids=["normuon-cautious-linear", "adamw-cautious-linear"])
def test_exact_resume_with_the_options_on(tmp_path, corpus_dir, options):
    whole = assert_resumes_exactly(lambda out, *a: main(run_args(corpus_dir, out, *a)), tmp_path, options, 3)
    ckpt = checkpoint.load(whole)
    groups = ckpt["optimizer"]["param_groups"]
    # the last update (step 5 of 6) ran at weight decay 0; the peaks are kept for a resume
    assert {g["weight_decay"] for g in groups} == {0.0}
    muon = "--train.optimizer=muon" in options
    assert {g["peak_weight_decay"] for g in groups} == ({0.05, 0.1, 0.0} if muon else {0.1, 0.0})
    states = ckpt["optimizer"]["state"].values()
    normuon = "--train.normuon=true" in options
    assert any("row_mean_square" in s for s in states) == normuon  # NorMuon ran in the loop, and its state is saved


# ----------------------------------------------------------------------------------------------- batch-size ramp
def test_accumulation_ramp_by_hand():
    from training.optim import accum_steps

    t = TrainSection(grad_accum=3, accum_ramp_steps=4)
    assert [accum_steps(s, t) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]  # 1 + 2 s // 4 until step 4
    assert [accum_steps(s, TrainSection(grad_accum=3)) for s in range(3)] == [3, 3, 3]  # off: the default


def test_accumulation_ramp_counts_its_tokens_and_resumes_exactly(tmp_path, corpus_dir, capsys):
    """6 updates of micro-batches of 4 x 64 tokens ramping 1, 1, 2, 2, 3, 3: train/tokens_seen adds 256 per
    micro-step actually run; stopped after 3 (inside the ramp) and resumed, the run is the uninterrupted one."""
    import json

    options = ["--train.optimizer=muon", "--train.grad_accum=3", "--train.accum_ramp_steps=4"]
    whole = assert_resumes_exactly(lambda out, *a: main(run_args(corpus_dir, out, *a)), tmp_path, options, 3)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: r["train/tokens_seen"] for r in rows if "train/tokens_seen" in r}
    assert seen == {1: 256, 2: 512, 3: 1024, 4: 1536, 5: 2304, 6: 3072}
    assert "(from 1 micro-step, ramped over 4 updates)" in capsys.readouterr().out


def test_accumulation_ramp_refuses_a_time_budget_and_a_ramp_to_nowhere():
    with pytest.raises(ValueError, match=r"train.accum_ramp_steps=4 needs a step count.*--train.max_steps"):
        parse_args(["--train.grad_accum=2", "--train.accum_ramp_steps=4"])  # pretrain's 10-minute budget
    parse_args(["--train.grad_accum=2", "--train.accum_ramp_steps=4", "--train.max_steps=10"])
    with pytest.raises(ValueError, match="set train.grad_accum to at least 2"):
        parse_args(["--train.accum_ramp_steps=4", "--train.max_steps=10"])
    with pytest.raises(ValueError, match=r"train.accum_ramp_steps=-1 must be >= 0"):
        parse_args(["--train.accum_ramp_steps=-1"])
    for ramp in (10, 12):  # a ramp as long as the run never reaches train.grad_accum
        with pytest.raises(ValueError, match=rf"train.accum_ramp_steps={ramp} is not shorter .*\(train.max_steps=10\)"):
            parse_args(["--train.grad_accum=2", f"--train.accum_ramp_steps={ramp}", "--train.max_steps=10"])
    parse_args(["--train.grad_accum=2", "--train.accum_ramp_steps=9", "--train.max_steps=10"])  # step 10 at 2


# ----------------------------------------------------------------------------------------------- sequence-length warmup
def test_row_length_and_cut_rows_by_hand():
    from data.shards import cut_rows
    from training.optim import row_length

    t = TrainSection(seq_warmup_len=16, seq_warmup_steps=3)
    assert [row_length(s, t, 64) for s in range(5)] == [16, 16, 16, 64, 64]
    assert [row_length(s, TrainSection(), 64) for s in range(2)] == [64, 64]  # off: the default
    x = torch.arange(16).reshape(2, 8)
    cut = cut_rows({"input_ids": x, "labels": x + 1}, 4)
    assert cut["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert (cut["labels"] == cut["input_ids"] + 1).all()  # every target stays beside its input


def first_batch(run_dir, args: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch the run at run_dir read: its loader rebuilt from its prepared shards."""
    from data import shards
    from data.tokenizer import Tokenizer
    from training.stages.pretrain import shard_dir

    cfg = parse_args(args)
    data = shards.open_prepared(shard_dir(cfg, Tokenizer.load(run_dir / "tokenizer.json")))
    loader = shards.TokenLoader(data.chunks("train"), cfg.train.batch_size, cfg.model.block_size, seed=cfg.train.seed)
    return loader.next_batch()


def test_seq_warmup_trains_on_cut_rows(tmp_path, corpus_dir):
    """Step 1 of a run with rows of 16 tokens (block_size 64) logs the loss of the initial model on its
    first batch cut into rows of 16 -- not the loss on the whole windows -- and the update after the warmup reads
    whole windows again (its loss differs from a run whose warmup lasts one step longer only from that step)."""
    import json

    from model.losses import token_ce_sum

    def losses(out, *extra):
        # lr 1e-30: every update is far below the weights' float32 spacing, so the weights stay the initial ones
        main(run_args(corpus_dir, out, "--train.lr=1e-30", "--model.dropout=0", *extra))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    warm = ["--train.seq_warmup_len=16", "--train.seq_warmup_steps=2"]
    two = losses(tmp_path / "two", *warm)
    three = losses(tmp_path / "three", "--train.seq_warmup_len=16", "--train.seq_warmup_steps=3")
    plain = losses(tmp_path / "plain")
    assert two[:2] == three[:2] and two[2] != three[2] and two[2] == plain[2]
    x, y = first_batch(tmp_path / "two", run_args(corpus_dir, tmp_path / "two", *warm))
    model = GPT(GPTConfig(**checkpoint.load(tmp_path / "two")["model_config"]))
    model.load_state_dict(checkpoint.load(tmp_path / "two")["model"])  # still the initial weights (lr 1e-30)
    model.eval()
    with torch.no_grad():
        cut_sum, n = token_ce_sum(model(x.reshape(-1, 16)), y.reshape(-1, 16))
        whole_sum, _ = token_ce_sum(model(x), y)
    assert two[0] == pytest.approx((cut_sum / n).item(), rel=1e-5)
    # an initial model is nearly context-free, yet the whole windows' loss differs by ~5x the tolerance (3e-4)
    assert two[0] != pytest.approx((whole_sum / n).item(), rel=1e-5)


def test_seq_warmup_resumes_exactly_and_refuses_bad_settings(tmp_path, corpus_dir):
    assert_resumes_exactly(lambda out, *a: main(run_args(corpus_dir, out, *a)), tmp_path,
                           ["--train.seq_warmup_len=32", "--train.seq_warmup_steps=4"], 2)
    with pytest.raises(ValueError, match="set both"):
        parse_args(["--train.seq_warmup_len=32"])
    with pytest.raises(ValueError, match="--stage sft rows are whole examples"):
        parse_args(["--stage", "sft", "--init-from", "x", "--train.seq_warmup_len=32", "--train.seq_warmup_steps=2"])
    with pytest.raises(ValueError, match=r"train.seq_warmup_len=24 must divide model.block_size=64"):
        main(run_args(corpus_dir, tmp_path / "bad", "--train.seq_warmup_len=24", "--train.seq_warmup_steps=2"))
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made
