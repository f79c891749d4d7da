"""Run by tests/evaluation/test_eval_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU): runs each
`onestep` command line of a JSON file (a list of argument lists) in this process, in order, and writes
every exit code to <file>-rank<R>.json beside it.

One command: it starts and destroys its own process group, as `onestep eval` launched on its own does.
Several: the group is started here, once, and the commands use it and leave it up (starting the default
group again after destroying it failed in this setting: gloo could not connect at the third start)."""
import json
import os
import sys
from pathlib import Path

import torch

from onestep.cli import main

if __name__ == "__main__":
    commands = Path(sys.argv[1])
    argvs = json.loads(commands.read_text())
    if len(argvs) > 1:
        from accelerate import PartialState

        PartialState(cpu=True)
    codes = [main(argv) for argv in argvs]
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    (commands.parent / f"{commands.stem}-rank{os.environ['RANK']}.json").write_text(json.dumps(codes))
    # Every result is on disk and the process group is destroyed. Skip the interpreter's teardown: with
    # torch's gloo threads a rank can still abort there now and then (see tests/onestep/distributed_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
