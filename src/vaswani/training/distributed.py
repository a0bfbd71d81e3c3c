"""Data-parallel training with torch.distributed: DistributedDataParallel, or FSDP (`fully_shard`) for
models that do not fit on one device.

`vaswani train` started by `torchrun` finds RANK, WORLD_SIZE and LOCAL_RANK in its environment and joins
the process group (NCCL on CUDA, gloo on the CPU). Every rank reads the same global batches (token-bucketed,
from (seed, epoch)); each takes its share of each global batch (`shard`), so the data order, and therefore
the checkpoint's data position, does not depend on the number of processes. That is what lets a run
saved by 2 processes resume on 1, or the reverse.

Checkpoints hold the unwrapped model (the same safetensors file a single process writes) and the optimizer
state keyed by parameter index as `torch.optim.Optimizer.state_dict` keys it: FSDP's sharded state is
gathered into that form on save and scattered back from it on load.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from vaswani.recipes import DISTRIBUTED

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process is one of a torchrun launch (torchrun sets these for every worker)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the job. A process not started by torchrun is rank 0 of 1, and every
    collective below is then a no-op."""

    mode: str = "ddp"  # ddp | fsdp: how the model is wrapped when the job has a process group
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group exists (torchrun), even of one process
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sums of `values` over all ranks, in float64 (token counts stay exact far beyond 2**24)."""
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, value: T) -> list[T] | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [value]
        out: list[T] | None = [None] * self.world_size if self.is_main else None  # type: ignore[list-item]
        dist.gather_object(value, out, dst=0)
        return out

    def on_main(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 only; the others wait for it. An exception there (a full disk, say) is
        raised on every rank, so that no rank waits forever at the next collective."""
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, action())
            except Exception as error:
                if not self.active:
                    raise
                outcome = (False, error)
        outcome = self.broadcast_from_main(outcome)
        if not outcome[0]:
            raise outcome[1]
        return outcome[1]


def setup(mode: str, device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun job, if this process belongs to one; return the context and this rank's device.

    Under torchrun a CUDA device becomes cuda:LOCAL_RANK (one GPU per process, NCCL); a CPU job uses gloo.
    """
    if mode not in DISTRIBUTED:
        raise ValueError(f"[train] distributed = {mode!r}: must be one of {DISTRIBUTED}")
    if not launched_by_torchrun():
        return Distributed(mode=mode), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # A caller that set up torch.distributed itself (to train several times in one job) keeps its group.
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(mode, rank, world, local_rank, active=True, owns_group=owns), device


def teardown(context: Distributed) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- data
def shard(spec: Any, rank: int, world_size: int) -> tuple[Any, bool]:
    """This rank's share of one global batch, and whether it is a stand-in.

    A global batch is a list of example indices (or a tensor of them, or an (epoch, number, indices) tuple
    for images). Rank r takes every world_size-th example from the r-th: the examples of a token bucket are
    sorted by length, so the strided shares have nearly the same padded size. When a batch has fewer
    examples than ranks, a rank left without any takes the batch's first example as a stand-in whose loss
    is weighted 0: every rank must still run a backward pass, or the all-reduce would wait forever.
    """
    if isinstance(spec, tuple):  # (epoch, number, indices): keep the batch's identity, split the indices
        *head, indices = spec
        share, stand_in = shard(indices, rank, world_size)
        return (*head, share), stand_in
    share = spec[rank::world_size]
    if len(share) == 0:
        return spec[:1], True
    return share, False


# ---------------------------------------------------------------------------------------- model
def wrap(model: nn.Module, context: Distributed, device: torch.device) -> nn.Module:
    """The model that the training step calls: DDP around it, or FSDP applied to it in place (each encoder
    and decoder layer its own shard group, then the rest). Without a process group, the model itself."""
    if not context.active:
        return model
    if context.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        for layer in getattr(stack, "layers", []):
            fully_shard(layer)
    fully_shard(model)
    if hasattr(model, "generate"):
        # Validation decodes with generate(), which reaches the embeddings without forward(): FSDP must
        # gather the root's parameters around it too.
        register_fsdp_forward_method(model, "generate")
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, context: Distributed, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a micro-step that is not the last of its optimizer step: the
    gradients add up locally and the final micro-step reduces the sum once (DDP's `no_sync`, FSDP's
    `set_requires_gradient_sync`)."""
    if not context.active or sync:
        if context.active and context.mode == "fsdp":
            model.set_requires_gradient_sync(True)
        yield
        return
    if context.mode == "ddp":
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    yield


def full_model_state(model: nn.Module, context: Distributed) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on CPU, on rank 0; None on the others. Under FSDP every rank must
    call it (the shards are gathered)."""
    if context.active and context.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return state if context.is_main else None
    if not context.is_main:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order `Optimizer.state_dict` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, context: Distributed
) -> dict[str, Any] | None:
    """The optimizer state keyed by parameter index, as a single process would save it, on rank 0 (None on
    the others). Under FSDP every rank must call it."""
    if not (context.active and context.mode == "fsdp"):
        return optimizer.state_dict() if context.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not context.is_main:
        return None
    names = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [index[name] for name in group["params"]]})
    return {"state": {index[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], context: Distributed
) -> None:
    """Load an index-keyed optimizer state (from any number of processes) into this rank's optimizer."""
    if not (context.active and context.mode == "fsdp"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    by_name = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
