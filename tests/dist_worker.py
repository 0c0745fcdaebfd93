"""Test worker for tests/test_distributed.py: train.py's main, run one or more times in the same processes, with
observation hooks. Not part of the trainer; the hooks only watch.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py ARGS... [--then ARGS...]...
    python tests/dist_worker.py ARGS...                      # a single process

Each ARGS is a train.py command line, optionally led by `--env NAME=VALUE` items set for that run only (e.g. the
trainer's own fault-injection hook GPTRAIN_FAULT) and by `--expect-error` (the run must fail with a user error on
every rank; the next run then starts), or `--evaluate` and a scripts/evaluate.py command line (named by its --json
file's name). `{rank}` in an argument becomes the process's rank: a path per rank stands for
a machine with its own disk. The runs share the processes (and so the start-up cost) and one
process group: the trainer's teardown is held back until the last run, because destroying a gloo group and creating
another in the same processes can hang. Each run ends with `rank R: finished NAME in S s`, or with
`rank R: error: ... (NAME, S s)` and the worker's exit with status 1, like train.py.

Environment:
    DIST_TEST_DUMP=DIR       for each run (named by its --out folder's name): the gradients just before its first
                             optimizer step, once per name (DIR/NAME.grads.rank<R>.pt, full tensors by parameter
                             name); one line per checkpoint save on every rank that takes part (DIR/NAME.saves.rank<R>);
                             the logits of the (wrapped) model on a fixed input at every save (DIR/NAME.logits.pt);
                             for the first MICRO_STEPS_LOGGED steps, one JSON line per step (DIR/NAME.micro.rank<R>):
                             how many parameters hold a .grad before each micro-step's forward and after the last
                             backward, each micro-batch's normalisation count and the rank's loss sum; the first
                             step's micro-batches (DIR/NAME.batches.rank<R>.pt); a DPO reference's parameter sizes
                             after wrapping, this rank's and in full (DIR/NAME.reference.rank<R>.json).
    DIST_TEST_CRASH=STEP     rank 1 dies (os._exit) right after optimizer step STEP of the first attempt
                             (TORCHELASTIC_RESTART_COUNT=0): a hardware fault for torchrun's elastic restarts
    DIST_TEST_HANG_S=S       a worker still running after S seconds prints every thread's stack and exits
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import training.distributed as distributed  # noqa: E402
import training.loop as loop  # noqa: E402
from training.checkpoint import clean_state_dict  # noqa: E402

MICRO_STEPS_LOGGED = 4


def probe_input(vocab_size: int, block_size: int) -> torch.Tensor:
    """The fixed input whose logits are compared: LongTensor[2, block_size]."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, block_size), generator=g)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered in full; every rank must call this."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


@contextlib.contextmanager
def hooks(dump_dir: str | None, name: str, crash_at: int = 0):
    """Install the observation hooks for one run named `name`; restore the trainer's functions afterwards."""
    real_build_optimizer, real_full_state = loop.build_optimizer, loop.full_state
    real_accumulate, real_wrap_reference = loop.accumulate_gradients, distributed.wrap_reference
    steps_done, steps_accumulated = [0], [0]
    dump = Path(dump_dir) if dump_dir else None

    def build_optimizer(model, t, device_type):
        opt = real_build_optimizer(model, t, device_type)
        names = {id(p): n for n, p in model.named_parameters()}

        def pre_step(optimizer, args, kwargs):
            if steps_done[0] == 0 and dump is not None and not (dump / f"{name}.grads.rank{_rank()}.pt").exists():
                grads = {n: _full(p.grad) for g in optimizer.param_groups for p in g["params"]
                         if (n := names.get(id(p))) is not None and p.grad is not None}
                torch.save(clean_state_dict(grads), dump / f"{name}.grads.rank{_rank()}.pt")

        def post_step(optimizer, args, kwargs):
            steps_done[0] += 1
            if crash_at and steps_done[0] == crash_at and _rank() == 1 and \
                    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os._exit(3)

        opt.register_step_pre_hook(pre_step)
        opt.register_step_post_hook(post_step)
        return opt

    def full_state(model, optimizer):
        out = real_full_state(model, optimizer)
        if dump is not None:
            with open(dump / f"{name}.saves.rank{_rank()}", "a") as f:
                f.write(f"{steps_done[0]}\n")
            cfg = next(m for m in model.modules() if hasattr(m, "cfg")).cfg
            was_training = model.training
            model.eval()
            with torch.no_grad():
                logits = model(probe_input(cfg.vocab_size, cfg.block_size).to(next(model.parameters()).device))
            model.train(was_training)
            if _rank() == 0:
                torch.save(_full(logits), dump / f"{name}.logits.pt")
        return out

    def accumulate_gradients(model, objective, batches, *args):
        if dump is None or steps_accumulated[0] >= MICRO_STEPS_LOGGED:
            return real_accumulate(model, objective, batches, *args)
        grads_set = []  # parameters holding a .grad: before each micro-step's forward, then after the last backward

        def observed(m, batch):
            grads_set.append(sum(p.grad is not None for p in model.parameters()))
            return objective(m, batch)

        loss_sum, metric_sums = real_accumulate(model, observed, batches, *args)
        grads_set.append(sum(p.grad is not None for p in model.parameters()))
        record = {"grads_set": grads_set, "counts": [int(objective.count(b)) for b in batches],
                  "loss_sum": float(loss_sum)}
        with open(dump / f"{name}.micro.rank{_rank()}", "a") as f:
            f.write(json.dumps(record) + "\n")
        if steps_accumulated[0] == 0:
            torch.save([{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches], dump / f"{name}.batches.rank{_rank()}.pt")
        steps_accumulated[0] += 1
        return loss_sum, metric_sums

    def wrap_reference(reference, *args):
        wrapped = real_wrap_reference(reference, *args)
        if dump is not None:
            params = list(wrapped.parameters())
            sizes = {"local": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
                     "full": sum(p.numel() for p in params), "sharded": all(hasattr(p, "to_local") for p in params)}
            (dump / f"{name}.reference.rank{_rank()}.json").write_text(json.dumps(sizes))
        return wrapped

    loop.build_optimizer, loop.full_state = build_optimizer, full_state
    loop.accumulate_gradients, distributed.wrap_reference = accumulate_gradients, wrap_reference
    try:
        yield
    finally:
        loop.build_optimizer, loop.full_state = real_build_optimizer, real_full_state
        loop.accumulate_gradients, distributed.wrap_reference = real_accumulate, real_wrap_reference


def run_name(argv: list[str], flag: str = "--out") -> str:
    for i, a in enumerate(argv):
        if a.startswith(f"{flag}="):
            return Path(a.split("=", 1)[1]).name
        if a == flag:
            return Path(argv[i + 1]).name
    raise ValueError(f"every run needs {flag}")


def evaluate_main(argv: list[str]):
    """scripts/evaluate.py's main (the scripts folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gptrain_script_evaluate", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str]) -> int:
    from train import main as train_main

    runs, current = [], []
    for a in argv:
        if a == "--then":
            runs.append(current)
            current = []
        else:
            current.append(a)
    runs.append(current)
    rank = os.environ.get("RANK", "0")
    real_teardown, distributed.teardown = distributed.teardown, lambda: None
    try:
        return _run_all(runs, rank, train_main)
    finally:
        distributed.teardown = real_teardown
        real_teardown()


def _run_all(runs: list[list[str]], rank: str, train_main) -> int:
    if float(os.environ.get("DIST_TEST_HANG_S", 0)) > 0:
        faulthandler.dump_traceback_later(float(os.environ["DIST_TEST_HANG_S"]), exit=True)
    for args in runs:
        env, expect_error = {}, False
        while args and args[0] in ("--env", "--expect-error"):
            if args[0] == "--expect-error":
                expect_error, args = True, args[1:]
                continue
            key, _, value = args[1].partition("=")
            env[key] = value
            args = args[2:]
        evaluate = bool(args) and args[0] == "--evaluate"
        args = [a.replace("{rank}", rank) for a in args[evaluate:]]
        name, t0 = run_name(args, "--json" if evaluate else "--out"), time.perf_counter()
        os.environ.update(env)
        try:
            if evaluate:
                evaluate_main(args)
            else:
                with hooks(os.environ.get("DIST_TEST_DUMP"), name, int(os.environ.get("DIST_TEST_CRASH", 0))):
                    train_main(args)
        except (ValueError, FileNotFoundError, loop.TrainingError) as e:
            report(rank, name, f"rank {rank}: error: {e} ({name}, {time.perf_counter() - t0:.1f} s)")
            if expect_error:
                continue
            return 1
        finally:
            for key in env:
                del os.environ[key]
        report(rank, name, f"rank {rank}: finished {name} in {time.perf_counter() - t0:.1f} s")
        if expect_error:
            return 1  # it should have failed
    return 0


def report(rank: int, name: str, line: str) -> None:
    """Print a status line, and keep it in DUMP/<name>.status.rank<R> too: two processes printing to one pipe can
    interleave their lines, a file per rank cannot."""
    print(line, flush=True)
    dump = os.environ.get("DIST_TEST_DUMP")
    if dump:
        with open(Path(dump) / f"{name}.status.rank{rank}", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
