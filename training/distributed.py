"""Process-group set-up, rank helpers, DDP / FSDP2 wrapping and reductions.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and every helper here is a
cheap no-op, so the loop has one code path. Backend: NCCL on CUDA (one process per GPU, the device from LOCAL_RANK),
gloo on CPU.

    torchrun --standalone --nproc_per_node=8 train.py ...                       # one machine
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 train.py ...                            # each machine, its own node_rank

How the pieces agree (see training/loop.py):
  - the loss is a sum divided by the step's global count (all micro-steps, all ranks); DDP and FSDP average
    gradients over ranks, so the loop multiplies by the world size once: N x batch B == 1 x batch N*B;
  - gradient synchronisation runs on the last micro-step only (maybe_no_sync: DDP's no_sync, FSDP2's
    set_requires_gradient_sync(False)); forward and backward both run inside it, since DDP reads the flag in the
    forward and FSDP2 in its post-backward hook;
  - a DPO reference is sharded like the policy under FSDP2, with the same mixed precision (wrap_reference);
  - stops are agreed: one all-reduce per step carries the loss (a NaN on any rank is a NaN on all) and the stop
    request (max over ranks); a time budget becomes rank 0's step count on every rank;
  - checkpoints are full state dicts gathered by every rank (FSDP) and written by rank 0, so they load into any
    world size and strategy; every forward under FSDP is a collective, so validation gives every rank the same
    number of batches.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import DistSection
from training.hostmem import keep_freed_memory


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""
    local_world_size: int = 1  # processes on this machine

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def launch_info() -> DistInfo:
    """The torchrun layout (rank, world size, processes per machine) from the environment, with no process group
    and no device: what code that runs before init() may know."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def init(dcfg: DistSection, device_request: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; pick this process's device from LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_request)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()  # each step reuses the buffers the last one freed, instead of faulting in fresh pages
    if world == 1:
        return DistInfo(device=device)
    backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=dcfg.timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def elastic_restarts() -> int:
    """How often torchrun may restart the workers (`--max-restarts`); 0 when not launched that way. With restarts,
    `--resume` on a folder without a checkpoint starts the run, so one command line serves every attempt."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_same_everywhere(values: dict[str, str], failure: Exception | None = None) -> None:
    """Every rank gathers every other rank's values (hashes of the data and tokenizer it trains on) and its set-up
    failure, if any, and stops on a failure anywhere or a difference, naming both values: every rank fails, not only
    the one that differs (which would leave the others waiting in their next collective until its timeout)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, {"values": values, "error": None if failure is None else str(failure)})
    if failure is not None:
        raise failure
    failed = [(rank, g["error"]) for rank, g in enumerate(gathered) if g["error"] is not None]
    if failed:
        rank, error = failed[0]
        raise ValueError(f"rank {rank} could not set up: {error}")
    first = gathered[0]["values"]
    for name in values:
        for rank, theirs in enumerate(g["values"] for g in gathered):
            if theirs.get(name) != first.get(name):
                raise ValueError(f"ranks disagree on the {name}: rank 0 has {first.get(name)}, rank {rank} has "
                                 f"{theirs.get(name)}; every node must use the same prepared data and tokenizer")


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo, param_dtype: torch.dtype | None):
    """DDP or FSDP2 around the single-device model (a single process gets the model unchanged).

    FSDP2: every block is its own shard unit, then the root; param_dtype (bf16) is the compute precision while the
    sharded master weights stay fp32 and gradients are reduced in fp32.
    """
    if strategy == "fsdp":
        return _fully_shard(model, param_dtype) if info.distributed else model
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def wrap_reference(reference: torch.nn.Module, strategy: str, info: DistInfo, param_dtype: torch.dtype | None):
    """The frozen DPO reference, wrapped to compute exactly as the policy does.

    Under FSDP2 (several processes) the policy computes with its weights cast to param_dtype by its
    MixedPrecisionPolicy and no autocast, so the reference is sharded the same way, with the same policy: the same
    bf16 weights through the same kernels, and only 1/world_size of its weights on each rank. Its root is asked to
    reshard after every forward (a policy's root keeps its gathered weights for the backward; the reference has no
    backward); FSDP2 honours that for a root module from torch 2.8 on, earlier ones keep the root's weights gathered.
    Otherwise the reference stays a plain module under the loop's autocast, as the policy's own module is: DDP has
    nothing to synchronise for a model without gradients.
    """
    if strategy == "fsdp" and info.distributed:
        return _fully_shard(reference, param_dtype, root_reshard_after_forward=True)
    return reference


def _fully_shard(model: torch.nn.Module, param_dtype: torch.dtype | None,
                 root_reshard_after_forward: bool | None = None):
    """FSDP2: every block its own shard unit, then the root (its embeddings, final norm and head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    # Passed only when asked for: torch < 2.8 types the argument bool (True) and refuses None
    root_options = {} if root_reshard_after_forward is None else {"reshard_after_forward": root_reshard_after_forward}
    fully_shard(model, mp_policy=mp, **root_options)
    return model


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, strategy: str, sync: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on all but the last micro-step of an
    accumulation. Run the micro-step's forward and backward inside."""
    if sync:
        yield
        return
    if strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
