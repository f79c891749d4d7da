"""Where `onestep eval` runs: its device (`--device auto`) and, under `accelerate launch` or torchrun,
the processes that share its work.

The commands split their work into chunks (sample shards, groups of image files); chunk c belongs to
process c mod world. Each process generates and extracts features of its own chunks only, and one
all-gather brings every chunk's result to every process, in chunk order, so the scored set is the one a
single process makes: the same features, bit for bit, when the chunks' batches are the same.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .fid import FIDInputError


def default_device() -> torch.device:
    """The accelerator of a single process: CUDA if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_device(device) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise FIDInputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise FIDInputError(f"--device {device}: CUDA is not available here; use --device auto or cpu")
    return d


def launched() -> bool:
    """Whether this process is one of several (accelerate launch, torchrun: WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Processes:
    """This process's rank among the evaluation processes, their number, its device, and the few
    collectives the commands need. One process (no WORLD_SIZE > 1 in the environment): rank 0 of 1,
    and every collective returns at once. The attribute names are an Accelerator's, so `generate_shards`
    takes this object as its `accelerator`."""

    def __init__(self, device="auto"):
        device = str(device)
        self._group = self._owner = False
        if launched():
            from accelerate import PartialState

            explicit = None if device == "auto" else _parse_device(device)
            if explicit is not None and explicit.index is not None:
                raise FIDInputError(f"--device {device}: under accelerate launch / torchrun each process takes its "
                                    f"own GPU; use --device auto or cuda")
            # accelerate picks the backend (NCCL on GPUs, gloo on CPUs) and each process's own GPU; without
            # a GPU it must be told cpu=True, or it starts the group but reports a single process
            on_cpu = explicit.type == "cpu" if explicit is not None else not torch.cuda.is_available()
            # a group that exists already (a caller's, e.g. a script running several commands) is used
            # and left up; one started here is destroyed by close()
            self._owner = not (torch.distributed.is_available() and torch.distributed.is_initialized())
            state = PartialState(cpu=on_cpu)
            if state.num_processes != int(os.environ["WORLD_SIZE"]):
                raise RuntimeError(f"accelerate sees {state.num_processes} processes but WORLD_SIZE is "
                                   f"{os.environ['WORLD_SIZE']}: an accelerate state of another setup is in "
                                   "this process")
            self.process_index, self.num_processes = state.process_index, state.num_processes
            # accelerate may say cpu:0: one CPU device either way
            self.device = torch.device("cpu") if on_cpu else state.device
            self._group = torch.distributed.is_available() and torch.distributed.is_initialized()
        else:
            self.process_index, self.num_processes = 0, 1
            self.device = default_device() if device == "auto" else _parse_device(device)

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def mine(self, num_chunks: int) -> list[int]:
        """The chunks of this process: c = rank, rank + world, ... (as `generate_shards` takes shards)."""
        return list(range(self.process_index, num_chunks, self.num_processes))

    @contextlib.contextmanager
    def main_process_first(self):
        """The main process runs the block first (e.g. downloads weights), the others after it, so
        that they find what it wrote. The block must not hold collectives."""
        if not self.is_main_process:
            self.wait_for_everyone()
        yield
        if self.is_main_process:
            self.wait_for_everyone()

    def wait_for_everyone(self) -> None:
        if self._group:
            torch.distributed.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL moves only GPU tensors; gloo only CPU ones
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def all_gather_object(self, obj) -> list:
        """A small picklable object of every process, in rank order."""
        if not self._group:
            return [obj]
        out = [None] * self.num_processes
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_chunks(self, results: dict[int, np.ndarray], num_chunks: int) -> list[np.ndarray]:
        """Every chunk's float64 [n_c, D] result, on every process, in chunk order, from each process's
        `results` {chunk: array} of its own chunks: one all-gather of the arrays (padded to the longest
        process's rows), after one of their shapes."""
        mine = sorted(results)
        local = [np.asarray(results[c], np.float64).reshape(len(results[c]), -1) for c in mine]
        if not self._group:
            return [local[mine.index(c)] for c in range(num_chunks)]
        shapes = self.all_gather_object([(c, a.shape[0], a.shape[1]) for c, a in zip(mine, local)])
        width = max((w for rank in shapes for _, _, w in rank), default=0)
        longest = max(sum(n for _, n, _ in rank) for rank in shapes)
        dev = self._comm_device()
        padded = torch.zeros((longest, width), dtype=torch.float64, device=dev)
        if local:
            rows = torch.from_numpy(np.concatenate(local)).to(dev)
            padded[:len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, padded)
        chunks: dict[int, np.ndarray] = {}
        for rank, part in zip(shapes, parts):
            part, at = part.cpu().numpy(), 0
            for c, n, _ in rank:
                chunks[c], at = part[at:at + n], at + n
        missing = [c for c in range(num_chunks) if c not in chunks]
        if missing:  # every process enumerates the same chunks; this is a bug, not bad input
            raise RuntimeError(f"chunks {missing[:5]} were processed by no process")
        return [chunks[c] for c in range(num_chunks)]

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every process: one decision that they all take together."""
        return all(self.all_gather_object(bool(flag)))

    def close(self, wait: bool = True) -> None:
        """Destroy the process group if it was started here (left up, a process can abort at
        interpreter exit), and accelerate's record of it; with `wait`, once every process is done
        (without: after an error, when the others may be inside another collective)."""
        if self._group and self._owner and torch.distributed.is_initialized():
            from accelerate.state import PartialState

            if wait:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            PartialState._reset_state()
        self._group = self._owner = False
