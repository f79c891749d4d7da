"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU): trains each
objective for a few steps and saves every rank's parameters, plus one MeanFlow gradient."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.config import load_config
from onestep.trainer import Trainer

OBJECTIVES = ["flow_matching", "splitmeanflow", "meanflow"]


def gmm_cfg(out: Path, objective: str, batch: int, steps: int):
    return load_config(None, [
        f"name={objective}", f"output_dir={out}", "teacher.name=gmm", "student.init=scratch",
        "student.backbone=mlp", "data.name=gmm", f"data.batch_size={batch}", f"train.steps={steps}",
        "train.progress=false", "train.checkpoint_every=1000", "train.log_every=10", "train.device=cpu",
        "train.num_threads=1", f"objective.name={objective}"])


def params(trainer) -> dict:
    return {n: p.detach().clone().contiguous() for n, p in trainer.student.named_parameters()}


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
        if objective == "meanflow":
            save_file({"samples": sharded_samples(t)}, out / f"samples-rank{rank}.safetensors")
    t = Trainer(gmm_cfg(out / "runs-grad", "meanflow", batch, 1))
    save_file(meanflow_gradient(t), out / f"meanflow-grad-rank{t.accelerator.process_index}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
