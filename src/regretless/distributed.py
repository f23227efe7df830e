"""Data-parallel training over torchrun processes, with PyTorch's FSDP2 (`fully_shard`); nothing home-made.

    torchrun --nproc-per-node N -m regretless sft ...      # or rl; the same configs and run folders

Single-process runs never touch this module's collectives: every helper below is the identity (or a no-op)
when `WORLD_SIZE` is unset or 1, so the trainer calls them unconditionally.

What is sharded: `shard(model)` applies `fully_shard` to each decoder block, then to the root (embeddings, final
norm, LM head), frozen base weights included; every rank holds 1/N of every parameter, gradient and AdamW state.
Gradients are reduce-scattered as sums (divide factor 1): the trainer already divides each rank's loss by the
step's *global* token count, so the summed gradient is exactly the single-process one.

Mixed precision on CUDA (`MixedPrecisionPolicy`, reduce_dtype fp32): LoRA keeps each parameter in its stored
dtype for the all-gather (the bf16 frozen base beside the fp32 adapters; autocast computes in bf16 as in one
process); FullFT all-gathers its fp32 master weights as bf16. On CPU everything stays fp32.

What is gathered: the trunk-and-head loss paths (`through_root`), which bypass `model.forward`, run inside the
root's FSDP hooks; RL decoding and greedy eval gather the whole model once per call (`gathered`) instead of once
per generated token, so ranks may stop decoding at different lengths; the final adapter (or full fp32 model) is
gathered and written by rank 0 alone; checkpoints are sharded (torch.distributed.checkpoint), every rank writing
its own shard. Only rank 0 writes run files and logs.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from regretless.config import umask_mode
from regretless.errors import UserError

T = TypeVar("T")
_ROOT_CALL = "_regretless_root_call"  # the FSDP-registered method that runs a function inside the root's hooks
_IN_ROOT = "_regretless_in_root"
_GATHERED = "_regretless_gathered"
TIMEOUT_ENV = "REGRETLESS_DIST_TIMEOUT"  # seconds a collective may wait for a peer (default 600)


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """True in a torchrun job of more than one process (after `init`)."""
    return world() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the torchrun job (idempotent; nothing to do for one process). gloo carries CPU tensors and NCCL CUDA
    ones; a collective that waits longer than REGRETLESS_DIST_TIMEOUT seconds for a peer fails the job."""
    if world() <= 1 or torch.distributed.is_initialized():
        return
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(f"WORLD_SIZE={world()} but {key} is not set; launch with torchrun "
                            "(torchrun --nproc-per-node N -m regretless ...)")
    nccl = torch.cuda.is_available() and torch.distributed.is_nccl_available()
    if nccl and int(os.environ["LOCAL_RANK"]) < torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before any NCCL call: one GPU a rank
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", timeout=timeout)


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK) in a job; `device` unchanged otherwise."""
    if not active() or device.type != "cuda":
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise UserError(f"local rank {index}: this node has {torch.cuda.device_count()} GPUs; start at most that "
                        "many processes a node (torchrun --nproc-per-node), or pass --device cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def global_micro_batch(per_rank: int | None, batch_size: int) -> int:
    """Sequences per forward pass summed over the ranks: `micro_batch_size` is per process, so N ranks run
    N x micro_batch_size a forward, each its own share (None: the whole step in one forward, split N ways)."""
    if per_rank is None:
        return batch_size
    n = per_rank * world()
    if batch_size % n:
        raise UserError(f"field 'micro_batch_size': {per_rank} sequences a forward on each of {world()} processes "
                        f"make {n} a forward, which does not divide batch_size={batch_size}; expected "
                        "micro_batch_size x processes to divide batch_size")
    return n


def share(n: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of n items (sizes differ by at most one)."""
    w, r = world(), rank()
    return r * n // w, (r + 1) * n // w


# ---------------------------------------------------------------------------------------------------- collectives


def _reduce(values: list[float], op: Any) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)  # CPU tensor: gloo, whatever the training device
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (the identity for one process)."""
    return _reduce(values, torch.distributed.ReduceOp.SUM if active() else None)


def all_max(value: int) -> int:
    return int(_reduce([value], torch.distributed.ReduceOp.MAX if active() else None)[0])


def mean_over_ranks(means: dict[str, float], weights: dict[str, float], maxima: tuple[str, ...] = ()
                    ) -> dict[str, float]:
    """`means[k]` is this rank's mean over `weights[k]` items: the mean over all ranks' items (where no rank has
    any, this rank's value stays). Keys in `maxima` take the largest value over ranks; any other key without a
    weight is summed over ranks (totals, throughputs)."""
    keys = [k for k in means if k not in maxima]
    flat = [x for k in keys for x in ((means[k] * weights[k], weights[k]) if k in weights else (means[k], 0.0))]
    tot = all_sum(flat)
    out = {}
    for i, k in enumerate(keys):
        s, w = tot[2 * i], tot[2 * i + 1]
        out[k] = (s / w if w > 0 else means[k]) if k in weights else s
    if maxima:
        out.update(zip(maxima, _reduce([means[k] for k in maxima], torch.distributed.ReduceOp.MAX)))
    return {k: out[k] for k in means}


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def on_rank0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on rank 0 only and hand its result (or its UserError, raised again) to every rank."""
    if not active():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except UserError as e:
            box[0] = ("error", str(e))
    return _unbox(box)


def _unbox(box: list[Any]) -> Any:
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


@contextlib.contextmanager
def rank0_context(make: Callable[[], contextlib.AbstractContextManager[T]]) -> Iterator[T]:
    """`with rank0_context(lambda: cm):` enters cm on rank 0 alone (held for the block) and yields its value on
    every rank; a UserError on entering is raised on every rank."""
    if not active():
        with make() as value:
            yield value
        return
    with contextlib.ExitStack() as stack:
        box: list[Any] = [None]
        if is_main():
            try:
                box[0] = ("ok", stack.enter_context(make()))
            except UserError as e:
                box[0] = ("error", str(e))
        yield _unbox(box)


# -------------------------------------------------------------------------------------------------------- sharding


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules of the classes the model names in `_no_split_modules`, else the
    children of its longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _root_call(self: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


def shard(model: nn.Module, amp: torch.dtype | None, lora: bool) -> nn.Module:
    """fully_shard each decoder block, then the root, over all ranks (in place; returns the model). See the
    module docstring for the mixed-precision policy."""
    if not active():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world(),))
    if amp is None:
        mp = MixedPrecisionPolicy()
    else:  # LoRA: bf16 base and fp32 adapters gathered as stored; FullFT: fp32 masters gathered as `amp`
        mp = MixedPrecisionPolicy(param_dtype=None if lora else amp, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum, not mean: the loss is already divided by global tokens
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    setattr(model, _ROOT_CALL, _root_call.__get__(model))
    register_fsdp_forward_method(model, _ROOT_CALL)
    return model


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, _ROOT_CALL)


def through_root(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for functions `fn(model, ...)` that call the model's trunk and LM head directly instead of
    `model.forward`: on a sharded model they run inside the root's FSDP forward hooks (root parameters gathered,
    their gradients reduced after backward). Nested calls run once, in the outermost."""

    @functools.wraps(fn)
    def call(model: nn.Module, *args: Any, **kwargs: Any) -> T:
        run = getattr(model, _ROOT_CALL, None)
        if run is None or getattr(model, _IN_ROOT, False) or getattr(model, _GATHERED, 0):
            return fn(model, *args, **kwargs)
        setattr(model, _IN_ROOT, True)
        try:
            return run(fn, model, *args, **kwargs)
        finally:
            setattr(model, _IN_ROOT, False)

    return call


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every parameter of a sharded model gathered whole on every rank for the duration (one all-gather per
    block, not one per forward): decoding then needs no collective, so ranks may run different numbers of
    forwards. Entering is collective (every rank must enter); nesting is free."""
    from torch.distributed.fsdp import FSDPModule

    depth = getattr(model, _GATHERED, 0)
    if not is_sharded(model) or depth:
        setattr(model, _GATHERED, depth + 1)
        try:
            yield
        finally:
            setattr(model, _GATHERED, depth)
        return
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    setattr(model, _GATHERED, 1)
    try:
        yield
    finally:
        setattr(model, _GATHERED, 0)
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def gathered_decoding(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for `fn(model, ...)` that decodes token by token: the whole call runs under `gathered(model)`."""

    @functools.wraps(fn)
    def call(model: nn.Module, *args: Any, **kwargs: Any) -> T:
        with gathered(model):
            return fn(model, *args, **kwargs)

    return call


def rank_rows(parts: list[dict[str, torch.Tensor]]) -> list[tuple[dict[str, torch.Tensor], float]]:
    """This rank's rows of each micro-batch of a step, with the weight of its loss. Every rank must run a forward
    for every micro-batch (FSDP's collectives pair up), so a rank left without rows (fewer rows than ranks) runs
    the micro-batch's first row at weight 0: zero gradients, nothing counted."""
    if not active():
        return [(p, 1.0) for p in parts]
    out = []
    for p in parts:
        lo, hi = share(p["input_ids"].shape[0])
        out.append(({k: v[lo:hi] for k, v in p.items()}, 1.0) if hi > lo else ({k: v[:1] for k, v in p.items()}, 0.0))
    return out


# --------------------------------------------------------------------------------------------- checkpoints, saving


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def _new_temp_dir(parent: Path) -> str:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    os.chmod(tmp, umask_mode(directory=True))  # mkdtemp's 0700: the usual modes under the umask
    return tmp


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int) -> Path:
    """checkpoints/step-N/{dcp/ (torch.distributed.checkpoint: trainable parameters and optimizer state, one shard
    file per rank), rng-<rank>.pt, state.json}; written into a temp folder that rank 0 renames once every rank is
    done, so a folder with state.json is complete. Collective."""
    import torch.distributed.checkpoint as dcp

    final = ckpt_dir / f"step-{step:08d}"
    tmp = Path(on_rank0(_new_temp_dir, ckpt_dir))
    msd, osd = _state_dicts(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng-{rank()}.pt")
    for f in [*(tmp / "dcp").iterdir(), tmp / f"rng-{rank()}.pt"]:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    barrier()
    if is_main():
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world(), **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(ck: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint written by `save_checkpoint` (collective). torch.distributed.checkpoint reshards on load,
    so another world size (one process included) reads it too; RNG state comes back only on the same one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not (ck / "dcp").is_dir():
        raise UserError(f"{ck}: written by a single process (no dcp/ folder); resume it without torchrun, "
                        "or start a new run")
    msd, osd = _state_dicts(model, optimizer)
    sd = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():  # one process reads every rank's shard: what we mean, no warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(ck / "dcp"), no_dist=not active())
    except Exception as e:  # noqa: BLE001 - a checkpoint of another model or setup
        raise UserError(f"{ck}: cannot load ({str(e).strip().splitlines()[0][:200]}); it belongs to a "
                        "different setup") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: not saved
    state = json.loads((ck / "state.json").read_text())
    saved_world = state.pop("world_size", None)
    rng_file = ck / f"rng-{rank()}.pt"
    if saved_world == world() and rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict, gathered in the parameters' own dtype (fp32 masters) onto rank 0's CPU
    (other ranks get {}); None for an unsharded model. Collective."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights (lm_head = embeddings): once,
        if first.setdefault(id(p), name) != name:  # as save_pretrained writes them from the model itself
            sd.pop(name, None)
    return sd
