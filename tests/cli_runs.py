"""Subprocess helpers of the whole-run tests: `python -m pmp` killed with SIGKILL once it has written a checkpoint
(the exact-resume tests), and a release loaded by stock `transformers` in a fresh interpreter without pmp."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pmp_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pmp", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_at_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as RUN/checkpoints holds a complete checkpoint at `step` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        ck = run_dir / "checkpoints"
        if ck.is_dir() and any((p / "manifest.json").is_file() and int(p.name[5:]) >= step for p in ck.glob("step_*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


STOCK_LOAD = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
              "transformers.AutoTokenizer.from_pretrained(sys.argv[1]); assert 'pmp' not in sys.modules")


def assert_stock_loadable(release: Path, cwd: Path) -> None:
    """`release` loads with stock transformers alone (model and tokenizer), pmp never imported."""
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(release)], check=True, cwd=cwd)
