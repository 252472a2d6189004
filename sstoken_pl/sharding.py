"""FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``: the helpers that the
module and the callbacks call, so that each of them stays strategy-agnostic.

A sharded model's parameters are ``DTensor`` s: each rank holds one shard (its *local* tensor). Everything the
callbacks keep per parameter (the EMA, the snapshot, the base copy of full fine-tuning) is kept as local tensors of
exactly those shards, updated shard by shard and never gathered whole. The history forward runs through the sharded
model itself: the history values are copied into the parameters' local shards for one forward and copied back
(``swapped_local_shards``), so FSDP2's all-gather before each layer gathers the history weights.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from sstoken_pl.errors import ConfigError
from sstoken_pl.models import unwrap

# Prefix of the history weights inside a distributed checkpoint's ``state_dict`` (never a model key).
HISTORY_PREFIX = "_sstoken_history."


def dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    cls = dtensor_cls()
    return cls is not None and isinstance(tensor, cls)


def is_sharded(model: Optional[nn.Module]) -> bool:
    """Whether ``model`` has parameters sharded as DTensors (FSDP2 / ``ModelParallelStrategy``)."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of the storage FSDP2 all-gathers from), or the tensor itself."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():  # the local tensor itself, not an autograd view of it
        return tensor.to_local()


def is_model_parallel(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def everywhere(flag: bool, sharded: bool) -> bool:
    """``flag`` on every rank (one tiny all-reduce) when ``sharded``, else ``flag``. A sharded model's forward is a
    collective: a rank may skip one (e.g. its values are cached) only if every rank skips it, or the ranks'
    all-gathers pair up wrongly (silently wrong values with gloo, a hang with NCCL)."""
    if not sharded:
        return flag
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


# ---------------------------------------------------------------------------------------------- sharding a model
def data_parallel_mesh(strategy: Any, pl_module: Any = None):
    """The 1-D mesh FSDP2 shards over: the strategy's ``data_parallel`` dimension.

    sstoken-pl applies FSDP2 only, no tensor parallelism; ``ModelParallelStrategy``'s default sizes (``"auto"``)
    put every process of a node in the tensor-parallel dimension, which would leave FSDP2 one rank and give every
    process the same batches. A mesh with a tensor-parallel dimension larger than 1 is therefore rebuilt as a pure
    data-parallel mesh over all processes (before the data loaders are built, so the samplers follow it).
    """
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        from lightning.fabric.strategies.model_parallel import _setup_device_mesh
        from lightning.pytorch.utilities import rank_zero_info

        world = strategy.world_size
        rank_zero_info(
            f"ModelParallelStrategy: sstoken-pl shards with FSDP2 only (no tensor parallelism): all {world} processes "
            f"form the data-parallel dimension (data_parallel_size={world}, tensor_parallel_size=1)"
        )
        mesh = _setup_device_mesh(world, 1, world, strategy.root_device)
        strategy._device_mesh = mesh
        strategy._data_parallel_size, strategy._tensor_parallel_size = world, 1
        if pl_module is not None:
            pl_module._device_mesh = mesh
    return mesh["data_parallel"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (plain or peft-wrapped): the modules of the classes it names
    in ``_no_split_modules``, else the longest ``nn.ModuleList``."""
    base = unwrap(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, mesh, reshard_root: Optional[bool] = None) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head and whatever else is left):
    the Hugging Face model, inside its peft wrapper if any.

    ``reshard_root``: free the root's gathered parameters after each forward too (a frozen model used only in
    forwards, such as the reference model); ``None`` keeps FSDP2's default for the root (kept gathered between
    forward and backward).
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"FSDP2: found no decoder layers to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The root is the Hugging Face model itself, also inside a peft wrapper (which holds no parameters of its own):
    # peft's generate() calls the inner model directly, and the root's hooks must run on every forward.
    root = unwrap(model)
    if reshard_root is None:
        fully_shard(root, mesh=mesh)
    else:
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard_root)
    return model


def mesh_of(model: nn.Module):
    """The device mesh of a sharded model's parameters."""
    return next(p.device_mesh for p in model.parameters() if is_dtensor(p))


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter of a sharded model (the root keeps its own gathered between the training
    forward and backward): the next forward or backward gathers again from the shards."""
    for module in fsdp_modules(model):
        module.reshard()


def named_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters as its shards: FSDP2 registers the gathered (whole, plain) parameters on a module while
    they are gathered (the root's stay gathered from a forward to the backward, or after a no-grad forward), so
    every module is resharded first."""
    if is_sharded(model):
        reshard_all(model)
    return dict(model.named_parameters())


@contextlib.contextmanager
def swapped_local_shards(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the sharded ``model`` computes with ``values`` (name → local shard, any float dtype) in
    place of those parameters: each rank copies its shards in, and back on exit.

    Safe between a training forward and its backward: every gathered parameter is freed before and after, so the
    block's forwards gather the swapped-in values and the backward gathers the restored ones (into the same
    storage that autograd saved).
    """
    with torch.no_grad():
        params = named_parameters(model)  # resharded: the registered parameters are the DTensor shards
        saved: dict[str, torch.Tensor] = {}
        try:
            for name, value in values.items():
                shard = local(params[name])
                saved[name] = shard.clone()
                shard.copy_(value)
            yield
        finally:
            reshard_all(model)
            for name, value in saved.items():
                local(params[name]).copy_(value)


def as_dtensor_like(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """``shard`` (this rank's piece of ``param``) as a DTensor sharded exactly as ``param``."""
    return dtensor_cls().from_local(
        shard, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def local_shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole tensor, as ``param`` is sharded (no communication: every rank has ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=local(param).device)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def load_distributed(path: str, templates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read the DTensors ``templates`` (checkpoint key → a DTensor of the right sharding, dtype and shape) from the
    ``state_dict`` of a distributed checkpoint directory written by ``ModelParallelStrategy``; each rank reads its
    shards. Returns the same keys, filled."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": dict(templates)}
    dcp.load(state, checkpoint_id=str(path))
    return state["state_dict"]


def num_rows(weight: torch.Tensor, model: nn.Module) -> int:
    """Rows of an embedding matrix whatever holds it: a DTensor (global shape), a DeepSpeed ZeRO-3 placeholder
    (``ds_shape``), an FSDP1 flattened view (1-D: the model config's ``vocab_size``), or a plain tensor."""
    shape = getattr(weight, "ds_shape", None) or weight.shape
    if len(shape) == 2:
        return int(shape[0])
    return int(model.config.vocab_size)


# ---------------------------------------------------------------------------------------------- checks
def strategy_kind(strategy: Any) -> str:
    """``fsdp2`` (ModelParallelStrategy), ``fsdp1`` (FSDPStrategy), ``deepspeed``, or ``other`` (single, DDP)."""
    if is_model_parallel(strategy):
        return "fsdp2"
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        return "deepspeed"
    if name == "FSDPStrategy":
        return "fsdp1"
    return "other"


def deepspeed_stage(strategy: Any) -> int:
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return 0
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_strategy(trainer: Any, what: str, needs_weights: bool) -> None:
    """Refuse, with one clear error, a strategy under which ``what`` (a ``HistoryModel``) cannot work.

    ``needs_weights``: it keeps its own per-parameter copies (EMA, snapshot, the base model of full fine-tuning) and
    puts them into the model for a forward. That works on whole parameters (one process, DDP, DeepSpeed ZeRO-1/2)
    and on FSDP2's DTensor shards, not on FSDP1's flattened shards nor on ZeRO-3's partitioned placeholders.
    """
    kind = strategy_kind(trainer.strategy)
    if not needs_weights:
        return
    if kind == "deepspeed" and deepspeed_stage(trainer.strategy) >= 3:
        raise ConfigError(
            f"{what}: its history weights cannot follow DeepSpeed ZeRO-3's partitioned parameters (they would be "
            f"copied from empty placeholders); use ZeRO-2 (configs/strategies/deepspeed_zero2.yaml), FSDP2 "
            f"(configs/strategies/fsdp2.yaml), or mode 'base' with LoRA (adapters off: no copy)"
        )
    if kind == "fsdp1":
        raise ConfigError(
            f"{what}: FSDP1 (FSDPStrategy) flattens the parameters into shards that the history weights cannot be "
            f"put into; use FSDP2 (configs/strategies/fsdp2.yaml: ModelParallelStrategy), or mode 'base' with LoRA "
            f"(adapters off: no copy)"
        )


def check_step_mean_supported(trainer: Any, value: str, key: str) -> None:
    """``loss_normalization: step`` rescales ``p.grad`` before the optimizer step; DeepSpeed's engine keeps the
    gradients in its own buffers (and averages accumulation itself), so the rescale would not reach them and the
    loss would silently become a sum."""
    if value == "step" and strategy_kind(trainer.strategy) == "deepspeed":
        raise ConfigError(
            f"{key}: 'step' rescales the gradients before the optimizer step, which DeepSpeed's engine does not "
            f"expose; set {key}: micro_batch under DeepSpeed (configs/strategies/deepspeed_*.yaml)"
        )


def check_whole_parameters(trainer: Any, model: Optional[nn.Module], what: str, key: str) -> None:
    """Refuse ``what``, which reads a module's weight outside that module's forward, under a strategy whose parameters
    are whole only inside it (FSDP2's DTensors, FSDP1's flat shards, ZeRO-3's placeholders)."""
    kind = strategy_kind(trainer.strategy)
    name = {"fsdp2": "FSDP2", "fsdp1": "FSDP1"}.get(kind)
    if kind == "deepspeed" and deepspeed_stage(trainer.strategy) >= 3:
        name = "DeepSpeed ZeRO-3"
    if name is None and is_sharded(model):
        name = "FSDP2"
    if name is not None:
        raise ConfigError(
            f"{what} reads the LM head's weight outside its module, which {name} gathers only inside it; set {key}"
        )


def check_gathering(trainer: Any, what: str, key: str) -> None:
    """Export and the answer-accuracy evaluation gather the model on rank 0: done for FSDP2 (every rank takes part),
    not implemented for FSDP1 or DeepSpeed ZeRO-3 (rank 0 alone would wait forever for the others' shards)."""
    kind = strategy_kind(trainer.strategy)
    if kind == "fsdp1" or (kind == "deepspeed" and deepspeed_stage(trainer.strategy) >= 3):
        name = "FSDP1 (FSDPStrategy)" if kind == "fsdp1" else "DeepSpeed ZeRO-3"
        raise ConfigError(
            f"{what} under {name} is not implemented (rank 0 would wait forever for the other ranks' shards); set "
            f"{key}, or use FSDP2 (configs/strategies/fsdp2.yaml)"
        )


# ---------------------------------------------------------------------------------------------- export
def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on rank 0's CPU (empty on the other ranks). A collective call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard_all(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain CPU model of ``model``'s architecture (peft wrapper included) holding ``state``, built on the meta
    device and filled by assignment: no second copy of the weights."""
    peft = unwrap(model) is not model
    base = unwrap(model)
    with torch.device("meta"):
        fresh = type(base)(base.config)
    if peft:
        import copy

        from peft import get_peft_model

        config = copy.deepcopy(model.peft_config[model.active_adapter])
        with torch.device("meta"):
            fresh = get_peft_model(fresh, config)
    missing, unexpected = fresh.load_state_dict(dict(state), strict=False, assign=True)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    buffers = dict(model.named_buffers())
    for name, buffer in list(fresh.named_buffers()):
        owner, _, attr = name.rpartition(".")
        module = fresh.get_submodule(owner) if owner else fresh
        if name in buffers:
            module._buffers[attr] = buffers[name].detach().to("cpu", copy=True)
    (fresh.get_base_model() if peft else fresh).tie_weights()
    return fresh


def export_sharded_hf(model: nn.Module, tokenizer: Any, path: str, is_global_zero: bool) -> Optional[str]:
    """``export_hf`` for a sharded model: gathers the whole state dict to rank 0's CPU (a collective call: every rank
    calls it), which merges LoRA and saves in Hugging Face format. Returns the path on rank 0, None elsewhere."""
    state = gather_full_state_dict(model)
    if not is_global_zero:
        return None
    fresh = unsharded_copy(model, state)
    del state
    if hasattr(fresh, "merge_and_unload"):
        fresh = fresh.merge_and_unload()
    os.makedirs(path, exist_ok=True)
    fresh.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
