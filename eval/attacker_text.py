"""The text a mask-recovery attacker has for the gradient attacks: a file of its own, a task's train split, or the
default LM probe (public data anyone can have).
"""

from __future__ import annotations

from pathlib import Path

from pmp.data.cache import is_prepared
from pmp.data.tasks import default_lm_probe, load_task


def load_attacker_texts(text_file: str = "", task: str = "", cache_dir: str = "") -> tuple[list[str], str]:
    """The attacker's text for gradient attacks: a file, a task's train split, or the default LM probe."""
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise FileNotFoundError(f"--text {p} does not exist")
        text = p.read_text(errors="replace")
        return [text[i: i + 2000] for i in range(0, len(text), 2000)], f"file {p}"  # chunks: below max length
    name = task or default_lm_probe()
    if not task and not is_prepared(cache_dir):
        return [], "none (data cache not prepared; pass --text FILE or --task NAME)"
    data = load_task(name, cache_dir)
    return list(data.train["text"]), f"task {name} (train split)"
