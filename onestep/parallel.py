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
        return self.optimizers[group].state_dict()

    def load_optimizer_state(self, group: str, objective, state: dict) -> None:
        self.optimizers[group].load_state_dict(state)

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
        """The group's AdamW state, whole, keyed by parameter names (on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(objective, self.optimizers[group],
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=False))

    def load_optimizer_state(self, group: str, objective, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(objective, self.optimizers[group], optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

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


def build(strategy: str, accelerator, objective, make_optimizers):
    """The strategy object for `strategy` ("ddp", "fsdp", "deepspeed"); one process is always plain."""
    if strategy == "ddp" or accelerator.num_processes == 1:
        return DataParallel(accelerator, objective, make_optimizers())
    if strategy == "fsdp":
        return FullyShardedDataParallel(accelerator, objective, make_optimizers)
    if strategy == "deepspeed":
        from onestep.parallel_deepspeed import DeepSpeedZero2

        return DeepSpeedZero2(accelerator, objective, make_optimizers)
    raise ValueError(f"unknown strategy {strategy!r}")
