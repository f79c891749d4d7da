"""Run by tests/onestep/test_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU): trains each
objective for a few steps and saves every rank's parameters (every group's for objectives with
auxiliary networks), plus one MeanFlow gradient and one f-distill generator gradient (with the global
h-mean and bin statistics, and once more with per-process statistics, which must differ)."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.config import load_config
from onestep.trainer import Trainer

OBJECTIVES = ["flow_matching", "splitmeanflow", "meanflow", "fdistill", "smd", "scm", "scm_ladd", "lightning"]
#: objectives with auxiliary networks (several optimizer groups): all their trainable state is compared
MULTI_GROUP = ["fdistill", "smd", "scm_ladd", "lightning"]
#: options per objective: the generators of f-distill and SMD update every 5th step, so a larger learning
#: rate makes 50 steps move them measurably (the test checks that training changed the parameters)
OBJECTIVE_OPTIONS = {"fdistill": ["objective.lr=1e-3"], "smd": ["objective.lr=1e-3", "objective.score_lr=1e-3"],
                     "scm": ["objective.lr=1e-3", "objective.tangent_warmup=10"],
                     "scm_ladd": ["objective.lr=1e-3", "objective.tangent_warmup=10"],
                     # MSE stage, then both adversarial phases (conditional, unconditional) with G/D alternation
                     "lightning": ["objective.teacher_steps=8", "objective.stages=[4,2,1]",
                                   "objective.stage_iters=[10,20,20]", "objective.lr=1e-3"]}
#: f-distill for the gradient check: forward KL (h = r varies most), 4 ratio bins, trained critics
FDISTILL_GRAD = ["objective.divergence=forward_kl", "objective.critic_per_generator=2", "objective.ratio_bins=4"]
FDISTILL_GRAD_STEP = 5  # after critic steps 0, 1, generator step 2, critic steps 3, 4: a generator step


def gmm_cfg(out: Path, objective: str, batch: int, steps: int, extra=()):
    return load_config(None, [
        f"name={objective}", f"output_dir={out}", "teacher.name=gmm", "student.init=scratch",
        "student.backbone=mlp", "data.name=gmm", f"data.batch_size={batch}", f"train.steps={steps}",
        "train.progress=false", "train.checkpoint_every=1000", "train.log_every=10", "train.device=cpu",
        "train.num_threads=1", f"objective.name={objective}", *OBJECTIVE_OPTIONS.get(objective, ()), *extra])


def params(trainer) -> dict:
    return {n: p.detach().clone().contiguous() for n, p in trainer.student.named_parameters()}


def trainable_state(trainer) -> dict:
    """Student, auxiliary networks and the objective's buffers (f-distill's bin statistics)."""
    return {k: v.detach().clone().contiguous() for k, v in trainer.objective.trainable_state_dict().items()}


def fdistill_generator_gradient(trainer, local_statistics: bool = False) -> dict:
    """The student's gradient at the generator step `trainer.step` (through the DDP-wrapped objective).
    `local_statistics`: pretend there is one process, so the h-mean and bins use this process's samples."""
    from onestep.objectives import distribution_matching

    assert trainer.objective.is_generator_step(trainer.step)
    obj, batch = trainer.objective, trainer.next_batch()
    state = obj.generator.get_state()
    original = distribution_matching._distributed
    if local_statistics:
        distribution_matching._distributed = lambda _obj: False
    try:
        out = trainer.model(batch, trainer.step)
        trainer.accelerator.backward(out["student"], inputs=trainer.groups["student"])
    finally:
        distribution_matching._distributed = original
        obj.generator.set_state(state)
    grads = {n: p.grad.detach().clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    trainer.optimizers["student"].zero_grad(set_to_none=True)
    return grads


def meanflow_gradient(trainer) -> dict:
    batch = trainer.next_batch()
    out = trainer.model(batch, 0)
    trainer.accelerator.backward(out["student"])
    return {n: p.grad.detach().clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


EVAL_NOISE = 37  # not a multiple of the processes or of the batch


def sharded_samples(trainer) -> torch.Tensor:
    from onestep.evaluation.generate import generate

    noise = torch.randn(EVAL_NOISE, 2, generator=torch.Generator().manual_seed(7))
    student = trainer.ema_student()
    return generate(lambda z: student.sample(z, steps=1), noise, batch_size=5, accelerator=trainer.accelerator)[0]


def main(out: Path, batch: int, steps: int) -> None:
    for objective in OBJECTIVES:
        t = Trainer(gmm_cfg(out / f"runs-{objective}", objective, batch, steps)).fit(resume=False)
        rank = t.accelerator.process_index
        save_file(params(t), out / f"{objective}-rank{rank}.safetensors")
        if objective in MULTI_GROUP:
            save_file(trainable_state(t), out / f"{objective}-all-rank{rank}.safetensors")
        if objective == "meanflow":
            save_file({"samples": sharded_samples(t)}, out / f"samples-rank{rank}.safetensors")
    t = Trainer(gmm_cfg(out / "runs-grad", "meanflow", batch, 1))
    save_file(meanflow_gradient(t), out / f"meanflow-grad-rank{t.accelerator.process_index}.safetensors")
    t = Trainer(gmm_cfg(out / "runs-fdistill-grad", "fdistill", batch, FDISTILL_GRAD_STEP,
                        FDISTILL_GRAD)).fit(resume=False)
    rank = t.accelerator.process_index
    save_file(fdistill_generator_gradient(t), out / f"fdistill-grad-rank{rank}.safetensors")
    save_file(fdistill_generator_gradient(t, local_statistics=True),
              out / f"fdistill-grad-local-rank{rank}.safetensors")
    t.close()  # destroy the process group before exit (left up, a rank can abort at interpreter shutdown)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    # Every result is on disk and the process group is destroyed. Skip the interpreter's teardown: with torch's
    # gloo threads, a rank still aborts there now and then ("terminate called without an active exception",
    # SIGABRT after the last file was written; seen in a fresh-clone CI run on 2026-12-07 despite close()).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
