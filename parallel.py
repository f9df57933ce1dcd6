"""Training on several GPUs under torchrun: DDP, or FSDP2 where memory is short. PyTorch's own machinery
(DistributedDataParallel, fully_shard, torch.distributed.checkpoint's state-dict functions); this file only
decides how the model is split and how a checkpoint is gathered and put back.

    torchrun --standalone --nproc_per_node=N train.py ...          # DDP: each GPU holds the whole model
    torchrun --standalone --nproc_per_node=N train.py ... --fsdp   # FSDP2: each holds 1/N of it

- DDP replicates the model. Only the trainable adapters have gradients, so one all-reduce of those per step.
- FSDP2 shards the frozen base and the adapters alike. Each block and its own adapters form one group,
  all-gathered just before the block runs (and again for its recompute under checkpointing) and freed after
  it; gradients are reduce-scattered, so each rank keeps 1/N of the weights, gradients and AdamW moments. The
  embeddings, output head and StageBlender form the root group. Every rank joins every forward (all-gathers),
  validation videos included. train.py loads the base on the CPU for it: fully_shard moves each group to
  the GPU as it shards it, so no GPU ever holds the whole base.
"""

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

TRAINABLE = dict(full_state_dict=True, ignore_frozen_params=True)  # whole tensors, only what trains


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun (RANK is set) it joins the process group:
    nccl on CUDA, gloo on the CPU, with a 2-hour timeout so that the other ranks can wait while rank 0
    renders a validation video. Without torchrun: (0, 1, cuda:0 or cpu)."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if not torch.cuda.is_available():
        return rank, world, torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return rank, world, device


def wrap(model: nn.Module, fsdp: bool) -> nn.Module:
    """What the training loop calls: the model itself (one process), DDP around it, or, with `fsdp`, the
    model sharded in place by FSDP2. Adapters must be attached (model.ext) and compiled blocks in place."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if not fsdp:
        return DistributedDataParallel(model, find_unused_parameters=True)
    for i, block in enumerate(model.blocks):  # one group: the block and the 4 adapters its forward calls
        # (the adapters themselves: a group is freed after its last module's forward, and a module that never
        # runs forward, such as their ModuleDicts, would keep it gathered until the model's forward ends)
        fully_shard([block, *model.ext.identity[i].values(), *model.ext.motion[i].values()])
    return fully_shard(model)  # the root group: embeddings, output head, controller


def accumulating(net: nn.Module, last: bool):
    """Context for one micro-batch's backward: DDP skips its all-reduce on all but the last micro-batch, so a
    step has one. FSDP2 reduce-scatters every micro-batch (its shards accumulate the gradient)."""
    if isinstance(net, DistributedDataParallel) and not last:
        return net.no_sync()
    return contextlib.nullcontext()


def trainable_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of what trains, as whole CPU tensors keyed by parameter name ("ext.…"), on
    rank 0; the other ranks get ({}, {}). Under FSDP2 it gathers the shards: every rank must call it."""
    return get_state_dict(model, opt, options=StateDictOptions(cpu_offload=True, **TRAINABLE))


def load_trainable_state(model: nn.Module, opt: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Put back what trainable_state returned (every rank passes the whole dicts; under FSDP2 each keeps its
    shard). Every trainable weight must be there; a parameter may lack optimizer state (an adapter family
    that had not trained yet when the checkpoint was written), and then has none after loading either."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if trainable.keys() != weights.keys():
        wrong = sorted(trainable.keys() ^ weights.keys())
        raise ValueError(f"the checkpoint's trainable weights do not fit this model ({len(wrong)} names "
                         f"differ, e.g. {wrong[0]})")  # fmt: skip
    set_model_state_dict(model, weights, options=StateDictOptions(**TRAINABLE))
    set_optimizer_state_dict(model, opt, optim, options=StateDictOptions(strict=False, **TRAINABLE))
    for name in trainable.keys() - optim["state"].keys():  # DCP gives every parameter a state (a step at lr
        opt.state.pop(trainable[name], None)  # 0); AdamW's bias correction must start where a fresh one would


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
