"""The one training loop, for every objective, through accelerate.

The objective returns one loss per optimizer group; the trainer owns everything else: accelerate
`prepare` (device, DDP, mixed precision), one AdamW per group on one LR schedule, the groups active
at each step, gradient accumulation and clipping, the student's EMA, checkpoints and exact resume,
a non-finite-loss guard, tensorboard scalars + metrics.jsonl, a progress bar and PNG sample grids.

Checkpoint layout (runs/<name>/checkpoints/step-XXXXXX/):
    trainable.safetensors    student + auxiliary nets (never the frozen teacher)
    ema.safetensors          EMA of the student's parameters
    optim-<group>.pt         tensors only: loaded with torch.load(weights_only=True)
    rng-<rank>.safetensors   per process: the objective's and the data's generators, torch's RNGs
    state.json               step, EMA step, counters
    checksums.json           SHA-256 of every file above
It is written to `step-XXXXXX.tmp` and renamed, so a kill during a save never leaves a broken latest
checkpoint; on resume a checkpoint whose files fail their checksums is skipped (with a warning) for
the one before it, and a complete one that lacks a file this run needs (another config wrote it) is
refused (onestep/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from onestep import parallel
from onestep.build import build_data, build_objective, build_student, build_teacher
from onestep.checkpoint import finished_checkpoints, latest_valid_checkpoint, write_checksums
from onestep.config import RunConfig, to_yaml
from onestep.sampling import SamplerSpec


class NonFiniteLossError(RuntimeError):
    pass


def _allow_new_mixed_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses an Accelerator with another mixed
    precision; runs trained one after another in one process (benchmarks, tests) may differ. Only the
    AcceleratorState is dropped: the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes that logged it (collective: every process calls it at the same step).

    An objective logs a loss per process from its own rows (a subset's loss only where the subset is non-empty),
    so with N processes of batch B the mean is what one process with N*B logs (exactly for equal-size parts);
    gradient norms are already global and come out unchanged."""
    from accelerate.utils import gather_object

    every = gather_object([values])
    keys = sorted({k for v in every for k in v})
    return {k: sum(v[k] for v in every if k in v) / sum(k in v for v in every) for k in keys}


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, teacher=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        tc = cfg.train
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        _allow_new_mixed_precision(tc.mixed_precision)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
        self.strategy = parallel.requested_strategy(tc.distributed)
        with parallel.accelerate_without_sharding():
            self.accelerator = Accelerator(
                cpu=tc.device == "cpu",
                mixed_precision=tc.mixed_precision,
                # the trainer accumulates micro-batches itself (the same way for every strategy)
                gradient_accumulation_steps=1,
                log_with="tensorboard",
                project_dir=str(self.run_dir),
                # groups may be inactive at a step (alternating schedules)
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            )
        acc = self.accelerator
        torch.manual_seed(cfg.seed)
        self.teacher = teacher if teacher is not None else build_teacher(cfg)
        student = build_student(cfg, self.teacher)
        self.objective = build_objective(cfg, student, self.teacher)
        self.data = build_data(cfg, self.teacher)
        # every random draw comes from these two generators, saved in checkpoints. They are seeded alike
        # on every process; each draws for the global batch and keeps its slice (`shard`), so N processes
        # with batch B train exactly like one process with batch N * B.
        self.objective.generator = torch.Generator().manual_seed(cfg.seed * 1000)
        # steps whose checkpoints are always written and never pruned (e.g. Lightning's stage ends)
        self.milestones = frozenset(self.objective.milestones())
        self.objective.shard = (acc.process_index, acc.num_processes)
        self.data_generator = torch.Generator().manual_seed(cfg.seed * 1000 + 1)

        self.groups = self.objective.param_groups()
        self.base_lr = {}

        def make_optimizers():  # after any sharding: the optimizers hold the sharded parameters
            optimizers = {}
            for g, params in self.objective.param_groups().items():
                d = self.objective.default_optim(g)
                lr = tc.lr if tc.lr is not None else d.lr
                wd = tc.weight_decay if tc.weight_decay is not None else d.weight_decay
                optimizers[g] = torch.optim.AdamW(params, lr=lr, betas=tuple(d.betas), eps=d.eps, weight_decay=wd)
                self.base_lr[g] = lr
            return optimizers

        self.parallel = parallel.build(self.strategy, acc, self.objective, make_optimizers, tc, cfg.data.batch_size)
        self.model = self.parallel.model
        self.optimizers = self.parallel.optimizers
        self.groups = self.parallel.groups

        from diffusers.training_utils import EMAModel

        # the EMA follows the student's trainable parameters (a LoRA student's frozen base never changes); under
        # FSDP each process keeps the EMA of its own shards, gathered whole into checkpoints
        self.ema_names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        # the parameter objects the optimizer updates (FSDP's shards), kept: between a forward and its backward
        # FSDP registers gathered copies on the modules instead
        self._ema_params = [dict(self.student.named_parameters())[n] for n in self.ema_names]
        self.ema = EMAModel(self._ema_params, decay=tc.ema_decay)
        self.ema.to(acc.device)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then a linear decay to 0 over the last `decay_steps` steps.

        A function of the training step, the same for every group: a group that is updated only on some
        steps (a generator every few critic steps, G/D alternation) follows the run's clock, not a count
        of its own updates, so `decay_steps` means the last steps of the run for all of them."""
        tc = self.cfg.train
        warm = min(1.0, (step + 1) / (tc.warmup_steps + 1))
        if tc.decay_steps <= 0:
            return warm
        return warm * min(1.0, max(0.0, (tc.steps - step) / tc.decay_steps))

    # ------------------------------------------------------------------------------------------
    @property
    def unwrapped(self):
        """The objective itself (self.model may be a DDP wrapper or a DeepSpeed engine around it)."""
        return self.objective

    @property
    def student(self):
        return self.objective.student

    def trainable_student_parameters(self) -> list:
        return list(self._ema_params)

    def ema_student(self):
        """A copy of the student holding the EMA weights (for sampling and evaluation in one process)."""
        if self.parallel.sharded:
            raise RuntimeError("the student is sharded (FSDP): sample with `with trainer.ema_weights():` on every "
                               "process, or load the checkpoint's weights (onestep export / onestep eval)")
        s = copy.deepcopy(self.student)
        params = dict(s.named_parameters())
        self.ema.copy_to([params[n] for n in self.ema_names])
        return s.eval()

    @contextlib.contextmanager
    def ema_weights(self):
        """The live student with its EMA weights swapped in, in eval mode; restored afterwards. Under FSDP every
        process must enter it (the student's forward gathers shards)."""
        params = self.trainable_student_parameters()
        was_training = self.student.training
        with torch.no_grad():
            trained = [p.detach().clone() for p in params]
            for p, shadow in zip(params, self.ema.shadow_params):
                p.copy_(shadow)
        self.student.eval()
        try:
            yield self.student
        finally:
            with torch.no_grad():
                for p, value in zip(params, trained):
                    p.copy_(value)
            self.student.train(was_training)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint; under FSDP every process takes part (the shards are gathered whole), and the
        main process writes everything but the per-process RNG files."""
        acc, par = self.accelerator, self.parallel
        final = self.ckpt_dir / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        obj = self.unwrapped
        # every process has its own generators: each saves its own RNG file
        rng = {"objective": obj.generator.get_state(), "data": self.data_generator.get_state(),
               "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng-{acc.process_index}.safetensors")
        # collective under FSDP: every process gathers, in the same order
        trainable = {k: par.full_tensor(v).detach().contiguous().cpu() for k, v in obj.trainable_state_dict().items()}
        ema = {n: par.full_tensor(s).detach().contiguous().cpu()
               for n, s in zip(self.ema_names, self.ema.shadow_params)}
        optim = {g: par.optimizer_state(g, obj) for g in self.groups}
        acc.wait_for_everyone()
        if not acc.is_main_process:
            acc.wait_for_everyone()  # until the main process has published the checkpoint
            return None
        save_file(trainable, tmp / "trainable.safetensors")
        save_file(ema, tmp / "ema.safetensors")
        for g, state in optim.items():
            torch.save(state, tmp / f"optim-{g}.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "grad_scaler.pt")
        state = {"step": self.step, "ema_optimization_step": self.ema.optimization_step,
                 "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "num_processes": acc.num_processes, "distributed": par.name}
        (tmp / "state.json").write_text(json.dumps(state))
        # how the student samples (kind, grid, scales, prediction type), for whoever loads it without its objective
        (tmp / SamplerSpec.FILE).write_text(json.dumps(obj.student.sampler_spec().to_dict()))
        write_checksums(tmp)
        for f in tmp.iterdir():  # make the files durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        dir_fd = os.open(self.ckpt_dir, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        # prune to the newest keep_checkpoints, never touching the milestones
        prunable = [p for p in finished_checkpoints(self.ckpt_dir) if int(p.name[5:]) not in self.milestones]
        for old in prunable[:-self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def checkpoint_files(self) -> tuple[str, ...]:
        """Files every checkpoint of this run must hold (checked against its checksums on resume)."""
        return ("trainable.safetensors", "ema.safetensors", "state.json", "rng-0.safetensors",
                *(f"optim-{g}.pt" for g in self.groups))

    def load_checkpoint(self, path: Path) -> None:
        """Load a checkpoint written by any number of processes and any strategy: weights, EMA and optimizer
        state are whole in the files. The generators of the objective and the data are the same on every
        process; torch's own RNG is per process (dropout): a run resumed with another number of processes
        continues from rank 0's, so only a resume with the same number repeats the interrupted run bitwise."""
        obj, par = self.unwrapped, self.parallel
        missing, unexpected = par.load_trainable_state(obj, load_file(path / "trainable.safetensors"))
        if unexpected or any(not k.startswith("teacher.") for k in missing):
            raise ValueError(f"checkpoint {path} does not match this run: missing {missing}, unexpected {unexpected}")
        ema = load_file(path / "ema.safetensors")
        absent = [n for n in self.ema_names if n not in ema]
        if absent:
            raise ValueError(f"checkpoint {path} does not match this run: its EMA lacks {absent[0]}")
        with torch.no_grad():
            for shadow, n in zip(self.ema.shadow_params, self.ema_names):
                shadow.copy_(par.shard_like(ema[n], shadow))
        load = lambda f: torch.load(path / f, map_location="cpu", weights_only=True)  # noqa: E731
        for g in self.groups:
            par.load_optimizer_state(g, obj, load(f"optim-{g}.pt"))
        if self.accelerator.scaler is not None and (path / "grad_scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(load("grad_scaler.pt"))
        rng_file = path / f"rng-{self.accelerator.process_index}.safetensors"
        if not rng_file.is_file():
            rng_file = path / "rng-0.safetensors"
        rng = load_file(rng_file)
        obj.generator.set_state(rng["objective"])
        self.data_generator.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        state = json.loads((path / "state.json").read_text())
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            self.accelerator.print(f"resuming a {state.get('num_processes', 1)}-process checkpoint with "
                                   f"{self.accelerator.num_processes} process(es): the same weights, optimizer state "
                                   "and data order; per-process randomness (dropout) continues from rank 0's")
        self.step = state["step"]
        self.ema.optimization_step = state["ema_optimization_step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)

    def maybe_resume(self) -> bool:
        latest = latest_valid_checkpoint(self.ckpt_dir, self.checkpoint_files())
        # corrupt checkpoints newer than the one resumed from are kept aside (renamed, never deleted),
        # so pruning cannot prefer them to the good ones written after the resume
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for bad in finished_checkpoints(self.ckpt_dir):
                if latest is None or int(bad.name[5:]) > int(latest.name[5:]):
                    bad.rename(bad.with_name(f"{bad.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"))
        self.accelerator.wait_for_everyone()
        if latest is None:
            return False
        self.load_checkpoint(latest)
        self.accelerator.print(f"resumed from {latest}")
        return True

    # ------------------------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """This process's slice of the global batch (data.batch_size per process)."""
        acc, size = self.accelerator, self.cfg.data.batch_size
        part = slice(acc.process_index * size, (acc.process_index + 1) * size)
        mine = self.data.batch(size * acc.num_processes, self.data_generator, part=part)
        return {k: None if v is None else v.to(acc.device) for k, v in mine.items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches) of every active group.

        A non-finite loss is agreed on by all processes (so no process waits in a collective for one that
        skipped backward); the step is then skipped everywhere. Under fp16 the gradient scaler handles
        non-finite gradients itself (it skips the update and lowers the scale).
        """
        acc, tc, par = self.accelerator, self.cfg.train, self.parallel
        logs: dict[str, float] = {}
        groups = self.objective.active_groups(self.step)
        factor = self.lr_factor(self.step)
        for g in groups:
            for pg in self.optimizers[g].param_groups:
                pg["lr"] = self.base_lr[g] * factor
        finite = True
        for micro in range(tc.grad_accum):
            with par.accumulating(last=micro == tc.grad_accum - 1):
                batch = self.next_batch()
                out = par.forward(batch, self.step)
                ok = torch.stack([torch.isfinite(out[g]).all() for g in groups]).float().min()
                if acc.num_processes > 1:
                    ok = acc.reduce(ok, "sum") / acc.num_processes
                if ok.item() < 1.0:
                    finite = False
                    logs["nonfinite_group"] = next((g for g in groups if not torch.isfinite(out[g]).all()), groups[0])
                    par.refuse_nonfinite(self.step, logs["nonfinite_group"])
                for i, g in enumerate(groups):
                    # backward runs on every rank even when skipping, so collective ops stay matched
                    loss = out[g] if finite else out[g].nan_to_num(0.0, 0.0, 0.0) * 0.0
                    par.backward(loss / tc.grad_accum, g, retain_graph=i < len(groups) - 1)
                par.after_backward()
                for k, v in out.items():
                    if k.startswith("log/"):
                        logs[k[4:]] = logs.get(k[4:], 0.0) + float(v) / tc.grad_accum
        for g in groups:
            gn = par.clip(g, tc.clip_grad_norm)
            if gn is not None:
                logs[f"grad_norm/{g}"] = float(gn)
                if acc.scaler is None and not torch.isfinite(torch.as_tensor(gn)).item():
                    finite = False
                    logs["nonfinite_group"] = g
        for g in groups:
            if finite:
                par.step(g)
            par.zero_grad(g)
        if not finite and acc.scaler is not None:
            acc.scaler.update()  # clipping unscaled the grads: reset the scaler's state
        par.end_step()
        if finite:
            self.ema.step(self.trainable_student_parameters())
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        return logs

    def fit(self, resume: bool = True, samples: bool = True) -> "Trainer":
        """Train to train.steps (resuming from the latest checkpoint unless `resume` is False); `samples`: write
        the final sample grid."""
        acc, tc = self.accelerator, self.cfg.train
        if resume:  # before anything is written: a checkpoint that fails to load leaves the run as it was
            self.maybe_resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        acc.init_trackers("tb")
        bar = None
        if tc.progress and acc.is_local_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc=self.cfg.name, dynamic_ncols=True, mininterval=2.0)
        metrics_path = self.run_dir / "metrics.jsonl"
        t0 = time.perf_counter()
        while self.step < tc.steps:
            logs = self.train_step()
            if self.nonfinite_in_a_row > 0:
                group = logs.get("nonfinite_group", "?")
                acc.print(f"step {self.step}: non-finite loss or gradient in group {group!r}; step skipped")
                if self.nonfinite_in_a_row > tc.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} non-finite steps in a row (group {group!r}, step {self.step}); "
                        f"stopped; the last good checkpoint is {latest_valid_checkpoint(self.ckpt_dir)}")
                continue
            self.step += 1
            if bar is not None:
                bar.update(1)
                if "loss" in logs:
                    bar.set_postfix(loss=f"{logs['loss']:.4g}")
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                scalars = {k: v for k, v in logs.items() if isinstance(v, float)}
                if acc.num_processes > 1:  # the objective's logs are this process's rows: the run's are the mean
                    scalars = mean_over_processes(scalars)
                factor = self.lr_factor(self.step - 1)  # the step just taken
                scalars["lr"] = self.base_lr[next(iter(self.groups))] * factor
                if len(self.groups) > 1:  # "lr" is the first group's; with critics, each group's too
                    scalars.update({f"lr/{g}": self.base_lr[g] * factor for g in self.groups})
                acc.log(scalars, step=self.step)
                if acc.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": self.step, "time_s": round(time.perf_counter() - t0, 3),
                                            **scalars}) + "\n")
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or self.step in self.milestones:
                self.save_checkpoint()
            if tc.sample_every and self.step % tc.sample_every == 0:
                self.save_samples()
        if bar is not None:
            bar.close()
        if samples:
            self.save_samples()
        for tracker in acc.trackers:  # the process group stays up: evaluation after training may be sharded
            tracker.finish()
        return self

    def close(self) -> None:
        """End of the process's training: trackers and the process group (accelerate's end_training)."""
        self.accelerator.end_training()

    @torch.no_grad()
    def save_samples(self, n: int | None = None) -> Path | None:
        """A PNG grid of EMA-student samples as images, one row block per step count in train.sample_steps.

        The samples carry the data's conditioning (the prompts file's first prompts, class labels 0, 1, ...,
        or none) and latents are decoded through the teacher's VAE, a few at a time. Vector data (points)
        has no grid. Under FSDP every process samples (the student's forward gathers its shards) and the
        main process writes."""
        shape = self.sample_shape()
        if len(shape) != 3 or not (self.parallel.sharded or self.accelerator.is_main_process):
            return None
        from torchvision.utils import save_image

        device = self.accelerator.device
        latent = self.teacher is not None and self.teacher.capabilities.vae
        n = n or (16 if latent else 64)
        noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        cond = self.data.sample_conditions(n)
        rows = []
        with self.ema_weights() as student, self.accelerator.autocast():
            for k in self.cfg.train.sample_steps:
                z = student.sample(noise, cond, steps=k)
                images = [self.teacher.decode(z[i:i + 4].to(self.teacher_dtype())).float() if latent else z[i:i + 4]
                          for i in range(0, n, 4)]
                rows.append(torch.cat(images).float().clamp(-1, 1).cpu())
        if not self.accelerator.is_main_process:
            return None
        out = self.run_dir / "samples" / f"step-{self.step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image((torch.cat(rows) + 1) / 2, out, nrow=int(math.ceil(math.sqrt(n))))
        return out

    def teacher_dtype(self) -> torch.dtype:
        p = next(self.teacher.parameters(), None)
        return torch.float32 if p is None else p.dtype

    def sample_shape(self) -> tuple[int, ...]:
        if self.teacher is not None:
            return tuple(self.teacher.sample_shape)
        return tuple(self.data.x.shape[1:]) if hasattr(self.data, "x") else ()
