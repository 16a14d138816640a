"""A tiny finished PMP run and dense run on the generated corpus, for tests that need real releases fast."""

from pathlib import Path

from corpus_fixture import write_corpus

from pmp.config import load_config
from pmp.train.trainer import pretrain


def tiny_pmp_and_dense(d: Path) -> dict[str, Path]:
    """{'pmp': RUN, 'dense': RUN}: 12 steps of a 32-wide Llama, mask identified at step 4 (rho 0.5)."""
    files = write_corpus(d, chars_per_file=4000)
    ov = {"data.corpus": files, "data.cache_dir": str(d / "cache"), "data.seq_len": 32, "data.val_fraction": 0.1,
          "tokenizer.vocab_size": 320, "model.preset": "tiny", "model.hidden_size": 32, "model.intermediate_size": 64,
          "train.steps": 12, "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 0,
          "train.eval_batches": 1, "train.log_every": 5, "train.ckpt_every": 0, "train.progress": False,
          "train.threads": 1, "pmp.min_warmup_steps": 4, "pmp.max_warmup_steps": 4, "pmp.density": 0.5}
    return {m: pretrain(load_config(None, [f"{k}={v}" for k, v in {**ov, "train.method": m}.items()]), d / m).root
            for m in ("pmp", "dense")}
