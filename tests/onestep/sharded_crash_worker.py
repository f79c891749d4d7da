"""One segment of a sharded (FSDP2) training run, for tests/onestep/test_sharded_crash.py: run under
`torchrun --nproc_per_node 2`; it resumes from the run's latest checkpoint and, if ONESTEP_TEST_KILL is set to
PHASE:STEP:RANK (or random:SECONDS:RANK), that rank kills itself with SIGKILL there (the phases of
tests/onestep/crash_worker.py: `step`, `rng`, `weights`, `rename`). torchrun then ends the other rank, as a cluster
does when one GPU's process dies.

    python -m torch.distributed.run --nproc_per_node 2 tests/onestep/sharded_crash_worker.py OUT NAME
"""
import os
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from crash_worker import STEPS, config, die, install_kill  # noqa: E402


def main(out: Path, name: str) -> None:
    from onestep.trainer import Trainer

    kill = os.environ.get("ONESTEP_TEST_KILL")
    if kill:
        phase, when, rank = kill.split(":")
        if int(rank) == int(os.environ.get("RANK", 0)):
            if phase == "random":
                threading.Timer(float(when), die).start()
            else:
                install_kill(phase, int(when))
    cfg = config(out, name)
    cfg.train.distributed = "fsdp"
    t = Trainer(cfg).fit(resume=True)
    assert t.step == STEPS
    t.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
