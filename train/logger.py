"""Run logging: metrics.jsonl always, one console line per log step, a progress bar, TensorBoard opt-in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # noqa: PLC0415 - POSIX only

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - non-POSIX
        return 0.0


class RunLogger:
    """`active=False` (the ranks other than 0 of a data-parallel job): writes and prints nothing."""

    def __init__(self, metrics_path: Path, total_steps: int, start_step: int, progress: bool, tensorboard_dir=None,
                 active: bool = True):
        self.path = metrics_path
        self.active = active
        self.file = open(metrics_path, "a", buffering=1) if active else None  # noqa: SIM115 - closed in close()
        self.bar = tqdm(total=total_steps, initial=start_step,
                        disable=not (active and progress and sys.stderr.isatty()), dynamic_ncols=True, leave=False)
        self.tb = None
        if tensorboard_dir is not None and active:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional dependency
            except ImportError as e:
                raise ValueError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict, console: str | None = None) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])
        if console:
            self.echo(console)

    def echo(self, line: str) -> None:
        if not self.active:
            return
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
