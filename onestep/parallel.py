"""How the one trainer spreads an objective over processes: data parallel, FSDP2 or DeepSpeed ZeRO-2.

`train.distributed` picks the strategy:

* ``auto``: what ``accelerate launch`` was configured for (its FSDP and DeepSpeed config files set
  ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), data parallel otherwise;
* ``ddp``: accelerate's ``prepare`` (DistributedDataParallel over N processes; plain on one);
* ``fsdp``: torch's FSDP2 (``fully_shard``), applied by onestep to every network of the objective: the
  blocks of each network are the sharding units, the frozen teacher's backbone is sharded too;
* ``deepspeed``: DeepSpeed ZeRO stage 2 (optimizer state and gradients partitioned), objectives with one
  optimizer group.

Why onestep shards itself instead of through accelerate's plugins: accelerate turns an FSDP or DeepSpeed
plugin into plain DDP on a CPU (``Accelerator(cpu=True)``), so its sharded path would only ever run on
GPUs. ``fully_shard`` and ``deepspeed.initialize`` run on CPUs over gloo, so the code that shards a
multi-GPU run is the code the tests run on two CPU processes. Accelerate still owns the processes,
devices, autocast, gathers and logging.

Every strategy offers the trainer the same few operations (`forward`, `backward`, `after_backward`,
`clip`, `step`, and the collective `full_tensor` / optimizer-state calls that checkpoints use), so the
trainer's loop reads the same for all three.
"""
from __future__ import annotations

import contextlib
import os

import torch

from onestep.errors import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
#: accelerate's launch settings that would make it shard on its own; hidden while the Accelerator is built
_ACCELERATE_SHARDING_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_CPU_RAM_EFFICIENT_LOADING")


def requested_strategy(setting: str) -> str:
    """`train.distributed` resolved: "auto" becomes what `accelerate launch` was configured for."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


@contextlib.contextmanager
def accelerate_without_sharding():
    """Build the Accelerator as for a plain multi-process launch: onestep applies FSDP2 / DeepSpeed itself."""
    saved = {k: os.environ.pop(k) for k in _ACCELERATE_SHARDING_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole_optimizer_state(objective, optimizer) -> dict:
    """An optimizer's state with every tensor whole and parameters named by their path in the objective
    (torch.distributed.checkpoint's layout): the same file whichever strategy and number of processes wrote it,
    loadable by any other. Collective when the parameters are sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    return get_optimizer_state_dict(objective, inner, options=StateDictOptions(full_state_dict=True))


def load_whole_optimizer_state(objective, optimizer, state: dict) -> None:
    """The inverse of `whole_optimizer_state`; also takes torch's own layout (parameters numbered), which
    checkpoints written before the named layout hold."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    groups = state.get("param_groups", [])
    if groups and groups[0].get("params") and isinstance(groups[0]["params"][0], int):
        inner.load_state_dict(state)
        return
    set_optimizer_state_dict(objective, inner, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------------
# data parallel (accelerate)


class DataParallel:
    """accelerate's `prepare`: DDP over several processes, the module itself on one."""

    name = "ddp"
    sharded = False

    def __init__(self, accelerator, objective, optimizers: dict):
        self.accelerator = accelerator
        names = list(optimizers)
        prepared = accelerator.prepare(objective, *[optimizers[g] for g in names])
        self.model = prepared[0]
        self.optimizers = dict(zip(names, prepared[1:]))
        self.groups = {g: [p for pg in o.param_groups for p in pg["params"]] for g, o in self.optimizers.items()}

    def forward(self, batch, step):
        return self.model(batch, step)   # accelerate's wrapper applies autocast

    def accumulating(self, last: bool):
        """Micro-batches before the last skip DDP's all-reduce; their gradients are reduced with the last."""
        if last or self.accelerator.num_processes == 1 or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss, group: str, retain_graph: bool) -> None:
        self.accelerator.backward(loss, inputs=self.groups[group], retain_graph=retain_graph)

    def after_backward(self) -> None:
        pass

    def clip(self, group: str, max_norm: float):
        return self.accelerator.clip_grad_norm_(self.groups[group], max_norm)

    def step(self, group: str) -> None:
        self.optimizers[group].step()

    def zero_grad(self, group: str) -> None:
        self.optimizers[group].zero_grad(set_to_none=True)

    def refuse_nonfinite(self, step: int, group: str) -> None:
        """A non-finite loss skips the step (the trainer's guard)."""

    def end_step(self) -> None:
        pass

    # -- checkpoints: parameters are whole on every process; rank 0 writes them
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shard_like(self, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A whole tensor from a checkpoint as `target` holds it here."""
        return value.to(target.device, target.dtype)

    def optimizer_state(self, group: str, objective) -> dict:
        return whole_optimizer_state(objective, self.optimizers[group])

    def load_optimizer_state(self, group: str, objective, state: dict) -> None:
        load_whole_optimizer_state(objective, self.optimizers[group], state)

    def load_trainable_state(self, objective, state: dict) -> tuple[list, list]:
        return objective.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------------
# FSDP2


def _block_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The sharding units inside a network: the entries of its `*blocks` ModuleLists (diffusers' down/up
    blocks, transformer blocks, FLUX's single blocks) and its mid block; the outermost only."""
    found: list[torch.nn.Module] = []
    for name, module in net.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_block = (leaf == "mid_block" and module is not None) or (
            isinstance(module, torch.nn.ModuleList) and leaf.endswith("blocks"))
        if not is_block:
            continue
        for unit in (module if isinstance(module, torch.nn.ModuleList) else [module]):
            inside = any(any(unit is m for m in outer.modules()) for outer in found)
            if not inside and any(p.numel() for p in unit.parameters()):
                found.append(unit)
    return found


def sharded_networks(objective) -> list[torch.nn.Module]:
    """What FSDP2 shards, outermost first: every top-level network of the objective that holds parameters
    (student, trainable teacher copies, discriminator heads), and the frozen teacher's backbone. The
    teacher's VAE and text encoders stay whole on every process (they only encode data)."""
    nets = []
    for name, child in objective.named_children():
        if name == "teacher":
            backbone = child.backbone() if hasattr(child, "backbone") else None
            if backbone is not None and any(True for _ in backbone.parameters()):
                nets.append(backbone)
        elif any(True for _ in child.parameters()):
            nets.append(child)
    return nets


class FullyShardedDataParallel:
    """torch FSDP2 over all processes: parameters, gradients and optimizer state sharded; each network's
    blocks all-gathered for their forward and freed after it.

    A group's backward cannot name its parameters (`backward(inputs=...)`): FSDP2 computes gradients on the
    gathered parameters and reduce-scatters them into the shards in its hooks, outside autograd's view of
    the sharded leaves. So every group's loss runs a plain backward, and the gradients it leaves on the
    *other* groups' parameters are dropped (theirs from earlier losses are put back): each group still
    trains on its own loss only."""

    name = "fsdp"
    sharded = True

    def __init__(self, accelerator, objective, make_optimizers):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.accelerator = accelerator
        device = accelerator.device
        objective.to(device)
        self.mesh = init_device_mesh(device.type, (accelerator.num_processes,))
        self.roots = []
        for net in sharded_networks(objective):
            for block in _block_modules(net):
                fully_shard(block, mesh=self.mesh)
            fully_shard(net, mesh=self.mesh)
            # a network's own parameters (embeddings, input/output layers) stay gathered until the step ends: a
            # second forward of the network whose output is not used (discriminator features read from its
            # blocks) would otherwise find them freed by the first forward's backward
            net.set_reshard_after_backward(False, recurse=False)
            self.roots.append(net)
        whole = [n for n, p in objective.named_parameters() if p.requires_grad and not is_dtensor(p)]
        if whole:  # a trainable parameter outside every unit would never be reduced: the ranks would drift
            raise RuntimeError(f"FSDP left trainable parameters unsharded (e.g. {whole[0]}): they belong to no "
                               "network of the objective")
        self.model = objective
        self.optimizers = make_optimizers()
        self.groups = {g: [p for pg in o.param_groups for p in pg["params"]] for g, o in self.optimizers.items()}

    def forward(self, batch, step):
        with self.accelerator.autocast():
            return self.model(batch, step)

    def accumulating(self, last: bool):
        for root in self.roots:
            root.set_requires_gradient_sync(last, recurse=True)
        return contextlib.nullcontext()

    def backward(self, loss, group: str, retain_graph: bool) -> None:
        others = [p for g, ps in self.groups.items() if g != group for p in ps]
        kept = [p.grad for p in others]
        for p in others:
            p.grad = None
        loss.backward(retain_graph=retain_graph)
        for p, g in zip(others, kept):
            p.grad = g

    def after_backward(self) -> None:
        pass

    def clip(self, group: str, max_norm: float):
        """Per-group clipping by the global norm: the DTensor norm reduces over every process's shard."""
        norm = torch.nn.utils.clip_grad_norm_(self.groups[group], max_norm)
        return norm.full_tensor() if is_dtensor(norm) else norm

    def step(self, group: str) -> None:
        self.optimizers[group].step()

    def zero_grad(self, group: str) -> None:
        self.optimizers[group].zero_grad(set_to_none=True)

    def refuse_nonfinite(self, step: int, group: str) -> None:
        """A non-finite loss skips the step (the trainer's guard)."""

    def end_step(self) -> None:
        """Free every gathered network: a root FSDP module stays gathered after a forward that no backward
        followed (e.g. the generator sampling under no_grad in a critic step), and the next step's optimizer
        update goes to the shards, which a still-gathered copy would not see."""
        for root in self.roots:
            root.reshard()

    # -- checkpoints: gathered collectively (every rank calls, in the same order); rank 0 writes
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if is_dtensor(t) else t

    def shard_like(self, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A whole tensor from a checkpoint as this process's shard of `target` (a DTensor like it)."""
        from torch.distributed.tensor import distribute_tensor

        value = value.to(target.device, target.dtype)
        return distribute_tensor(value, target.device_mesh, target.placements) if is_dtensor(target) else value

    def optimizer_state(self, group: str, objective) -> dict:
        """The group's AdamW state, whole (gathered from the shards on every rank)."""
        return whole_optimizer_state(objective, self.optimizers[group])

    def load_optimizer_state(self, group: str, objective, state: dict) -> None:
        load_whole_optimizer_state(objective, self.optimizers[group], state)

    def load_trainable_state(self, objective, state: dict) -> tuple[list, list]:
        """Whole tensors into the shards (each rank keeps its own slice)."""
        own = objective.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        with torch.no_grad():
            for k, value in state.items():
                if k not in own:
                    continue
                target = own[k]
                target.copy_(self.shard_like(value, target))
        return missing, unexpected


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2


class DeepSpeedZero2:
    """DeepSpeed ZeRO stage 2: the optimizer's fp32 state and the gradients partitioned over the processes,
    parameters whole on each (so the EMA, sampling and the teacher work as under DDP).

    One DeepSpeed engine drives one optimizer and owns the backward of the whole module, so objectives with
    several optimizer groups (critics, discriminators) are refused. DeepSpeed's own bf16 mode (bf16 weights)
    is off: compute runs under accelerate's autocast, as with the other strategies, over fp32 master weights.
    The engine clips by the global norm (`gradient_clipping` = train.clip_grad_norm) and steps at the end of
    each train.grad_accum micro-batches. It cannot skip an update, so a non-finite loss stops the run."""

    name = "deepspeed"
    sharded = False

    def __init__(self, accelerator, objective, make_optimizers, micro_batch: int, grad_accum: int,
                 clip_grad_norm: float):
        import deepspeed

        optimizers = make_optimizers()
        if len(optimizers) != 1:
            raise ConfigError(f"train.distributed=deepspeed trains objectives with one optimizer group; this one has "
                              f"{len(optimizers)} ({', '.join(optimizers)}): use train.distributed=fsdp or ddp")
        self.accelerator = accelerator
        (group, optimizer), = optimizers.items()
        # the parameters before ZeRO replaces the optimizer's lists by flat partitions
        self.groups = {group: [p for pg in optimizer.param_groups for p in pg["params"]]}
        deepspeed.init_distributed(dist_backend="nccl" if accelerator.device.type == "cuda" else "gloo")
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
                  "gradient_clipping": clip_grad_norm, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False}
        objective.to(accelerator.device)
        self.engine, zero_optimizer, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
        self.model = self.engine
        self.optimizers = {group: zero_optimizer}
        self.names = {p: n for n, p in objective.named_parameters()}

    def forward(self, batch, step):
        with self.accelerator.autocast():
            return self.engine(batch, step)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # the engine knows its accumulation boundary

    def backward(self, loss, group: str, retain_graph: bool) -> None:
        self.engine.backward(loss, retain_graph=retain_graph, scale_wrt_gas=False)  # the trainer divided already

    def after_backward(self) -> None:
        self.engine.step()  # a real update only at the accumulation boundary

    def clip(self, group: str, max_norm: float):
        return self.engine.get_global_grad_norm()  # clipped by the engine; the norm before clipping, for the logs

    def step(self, group: str) -> None:
        pass

    def zero_grad(self, group: str) -> None:
        pass

    def refuse_nonfinite(self, step: int, group: str) -> None:
        raise FloatingPointError(f"step {step}: non-finite loss in group {group!r}; DeepSpeed cannot skip an update, "
                                 "so the run stops here: resume from the last checkpoint "
                                 "(or use train.distributed=ddp)")

    def end_step(self) -> None:
        pass

    # -- checkpoints: parameters are whole everywhere; the optimizer state is gathered from the partitions
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shard_like(self, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return value.to(target.device, target.dtype)

    def optimizer_state(self, group: str, objective) -> dict:
        """AdamW's state, whole per parameter and keyed by name, as FSDP's checkpoints hold it (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        zero = self.optimizers[group]
        inner = zero.optimizer.state
        step = next((st["step"] for st in inner.values() if "step" in st), None)
        state = {}
        for p in self.groups[group]:
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            if step is not None and moments["exp_avg"] is not None:
                state[self.names[p]] = {"step": torch.as_tensor(step).clone(), **moments}
        groups = [{k: v for k, v in pg.items() if k != "params"}
                  | {"params": [self.names[p] for p in self.groups[group]]}
                  for pg in zero.param_groups]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, group: str, objective, state: dict) -> None:
        """Whole per-parameter AdamW state into the partitions; the fp32 master copies from the loaded weights."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.optimizers[group]
        saved = state.get("state", {})
        with torch.no_grad():
            for p in self.groups[group]:
                safe_set_full_fp32_param(p, p.detach().float())
                entry = saved.get(self.names[p])
                if entry is None:
                    continue
                for k in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, entry[k].float(), k)
        steps = [entry["step"] for entry in saved.values()]
        if steps:
            for st in zero.optimizer.state.values():
                st["step"] = torch.as_tensor(steps[0]).clone().to(st["step"]) if torch.is_tensor(st.get("step")) \
                    else steps[0]
        for pg, saved_group in zip(zero.param_groups, state.get("param_groups", [])):
            pg.update({k: v for k, v in saved_group.items() if k != "params"})

    def load_trainable_state(self, objective, state: dict) -> tuple[list, list]:
        return objective.load_state_dict(state, strict=False)


def build(strategy: str, accelerator, objective, make_optimizers, train_cfg, batch_size: int):
    """The strategy object for `strategy` ("ddp", "fsdp", "deepspeed"); one process is always plain."""
    if strategy == "ddp" or accelerator.num_processes == 1:
        return DataParallel(accelerator, objective, make_optimizers())
    if strategy == "fsdp":
        return FullyShardedDataParallel(accelerator, objective, make_optimizers)
    if strategy == "deepspeed":
        return DeepSpeedZero2(accelerator, objective, make_optimizers, batch_size, train_cfg.grad_accum,
                              train_cfg.clip_grad_norm)
    raise ValueError(f"unknown strategy {strategy!r}")
