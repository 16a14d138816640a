"""The recipes of the core verbs: `RunConfig` (`pmp pretrain`: data, tokenizer, model, train, pmp) and
`ExportConfig` (`pmp export`).

Every field carries a one-line doc (with units) in its metadata; ``pmp <verb> --help`` prints them all. Loading,
overrides and error messages come from `pmp.typed_config`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pmp.presets import PRESETS
from pmp.typed_config import check as _check
from pmp.typed_config import doc, from_dict, load_typed


@dataclass
class DataConfig:
    cache_dir: str = doc("where prepared corpora, tasks, tokenizers and token blocks live ('' = ~/.cache/pmp)", "")
    corpus: str = doc(
        "pre-training text: 'default' (registry corpus, see `pmp data prepare`), or comma-separated local "
        "files (txt/jsonl/csv/parquet), or 'hub:NAME' for a hub dataset (needs network)",
        "default",
    )
    text_column: str = doc("column holding the text in jsonl/csv/parquet/hub corpora", "text")
    max_chars: int = doc("use at most this many characters of the corpus (0 = all); keeps debug runs fast", 0)
    val_fraction: float = doc("fraction of the corpus held out for perplexity (split by document, fixed)", 0.02)
    seq_len: int = doc("tokens per training block (context length)", 256)


@dataclass
class TokenizerConfig:
    path: str = doc("'' = train a byte-level BPE on the corpus (cached); else a local HF tokenizer directory", "")
    vocab_size: int = doc("vocabulary size of the trained BPE (tokens)", 8192)


@dataclass
class ModelConfig:
    preset: str = doc("named shape: tiny | small | base125m | tinyllama1b (see pmp/presets.py)", "small")
    arch: str = doc("architecture family: llama | gpt2 ('' = the preset's)", "")
    hidden_size: int = doc("override the preset's hidden size (0 = preset)", 0)
    num_layers: int = doc("override the preset's number of layers (0 = preset)", 0)
    num_heads: int = doc("override the preset's number of attention heads (0 = preset)", 0)
    intermediate_size: int = doc("override the preset's MLP width (0 = preset)", 0)
    init_seed: int | None = doc(
        "seed for the initial weights; null = drawn from OS entropy (recommended: a pinned seed lets "
        "anyone regenerate the init and read the frozen complement)",
        None,
    )


@dataclass
class TrainConfig:
    method: str = doc("pmp (private mask pre-training) | dense (the baseline)", "pmp")
    steps: int = doc("optimizer steps in total (for pmp: warm-up steps included)", 1000)
    batch_size: int = doc("sequences per micro-batch", 16)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    lr: float = doc("peak learning rate", 3e-3)
    min_lr_ratio: float = doc("final learning rate of the cosine schedule, as a fraction of lr", 0.1)
    warmup_steps: int = doc("linear learning-rate warm-up (steps)", 50)
    weight_decay: float = doc("AdamW decoupled weight decay", 0.1)
    beta1: float = doc("AdamW beta1", 0.9)
    beta2: float = doc("AdamW beta2", 0.95)
    eps: float = doc("AdamW epsilon", 1e-8)
    grad_clip: float = doc("clip the global gradient norm to this (0 = off)", 1.0)
    skip_nonfinite_batches: bool = doc("skip a batch whose loss is NaN/inf instead of stopping the run (off: a "
                                       "non-finite loss stops with an error naming the step)", False)
    data_seed: int = doc("seed of the batch order (independent of the init seed: equal seeds = equal batches)", 0)
    eval_every: int = doc("held-out perplexity every N steps (0 = only at start and end)", 100)
    eval_batches: int = doc("held-out micro-batches per evaluation (0 = the whole held-out split)", 20)
    log_every: int = doc("one console line + one metrics.jsonl row every N steps", 10)
    ckpt_every: int = doc("resumable checkpoint every N steps (0 = only at the end)", 200)
    keep_last: int = doc("resumable checkpoints kept (older ones are deleted)", 2)
    snapshot_every: int = doc(
        "keep the weights (only) every N steps in RUN/snapshots, never deleted (0 = off): earlier states give "
        "quality-matched dense baselines (`pmp export --step`, `pmp pipeline --matched-baseline`)", 0)
    device: str = doc("auto | cpu | cuda | cuda:N (under torchrun: auto, cpu or cuda; rank r uses cuda:LOCAL_RANK)",
                      "auto")
    parallel: str = doc(
        "data parallelism under torchrun: auto | none | ddp | fsdp. auto: none in one process; under torchrun ddp "
        "(replicated model, compact gradients all-reduced) below 2e9 parameters, fsdp (sharded) above. The global "
        "batch is batch_size x grad_accum sequences whatever the number of ranks (docs/distributed.md)", "auto")
    bf16: bool = doc("bf16 autocast on CUDA (ignored on CPU)", True)
    deterministic: bool = doc("deterministic algorithms (needed for bit-exact resume; slower on GPU)", True)
    threads: int = doc("CPU threads for torch (0 = torch's default)", 0)
    progress: bool = doc("show a progress bar", True)
    tensorboard: bool = doc("also write TensorBoard events to RUN/tb (needs the tensorboard package)", False)


@dataclass
class PMPConfig:
    density: float = doc("rho: fraction of entries in the private mask, in (0, 1]", 0.5)
    scorer: str = doc("entry score for identification: grad | weight | weight_grad | random", "grad")
    selection: str = doc(
        "top-rho within each tensor (per_tensor) or over all masked tensors together (global, the paper's choice; "
        "raw |grad| scales differ per tensor, and global selection gave attention q/k ~0 % density on our runs)",
        "per_tensor",
    )
    scope: str = doc(
        "which parameters get a mask: matrices (every >= 2-D tensor: embeddings, linear, lm_head; norms and biases "
        "train densely) | all (norms too, the paper's choice: frozen norm entries stay exactly 1.0, which reveals "
        "the mask on norms) | linear (2-D nn.Linear weights only)",
        "matrices",
    )
    block_size: int = doc("0 = unstructured mask; 64 or 128 = block mask on 2-D linear weights", 0)
    ema_beta: float = doc("exponential smoothing of scores across warm-up steps (0 = raw per-step scores)", 0.98)
    iou_threshold: float = doc("mask is stable when the IoU of masks iou_lag_steps apart >= this ...", 0.99)
    patience: int = doc("... for this many consecutive checks", 2)
    iou_lag_steps: int = doc(
        "compare the mask with the one this many steps earlier (a check every this many steps); with EMA-smoothed "
        "scores masks of consecutive steps agree by construction, so 1 stops at min_warmup_steps", 25)
    min_warmup_steps: int = doc("never stop identification before this many dense steps", 20)
    max_warmup_steps: int = doc("stop identification here even if the mask is not stable", 500)
    rewind: bool = doc("reset all weights to their initial values after identification", True)
    complement: str = doc(
        "the entries outside the mask in masked training: frozen (bit-exactly at their initial values) | project "
        "(the authors' code: at the rewind the whole model's complement is scaled to L2 norm complement_radius, "
        "nearly zero, then frozen there; see pmp/complement.py)", "frozen")
    complement_radius: float = doc(
        "project: L2 radius R of the complement of all masked tensors together (0 = auto: 2 x sqrt(complement "
        "entries / 550,024,192), the authors' R = 2 scaled to this model's size; 0.164 at small, rho 0.5)", 0.0)
    variant: str = doc(
        "none (PMP: warm-up, identification, rewind, masked training) | trap (V1: the mask is identified as usual, "
        "then training stays DENSE -- no rewind, nothing frozen -- and the last trap_fraction of steps adds the "
        "mask-keyed trap term, train/trap.py) | illcond (V3: the mask is a secret random `density` share of the input "
        "channels of every nn.Linear, drawn at step 0; dense training plus the keyed ill-conditioning regulariser, "
        "train/illcond.py). Both variants release dense weights trained everywhere; the mask stays in RUN/private "
        "as the owner's fine-tuning key", "none")
    trap_fraction: float = doc("trap: the trap term is on for the last this fraction of train.steps", 0.2)
    trap_weight: float = doc("trap: lambda_t, weight of the bounded trap loss of the model after a simulated "
                             "unmasked sign step (0 = off: a control arm that trains like trap without the term)", 1.0)
    trap_owner_weight: float = doc("trap: lambda_o, weight of the LM loss of the model after a simulated masked "
                                   "(owner) sign step (0 = off)", 1.0)
    trap_loss: str = doc("trap: bounded loss of the simulated attacker's model (train/suppression.py): klu (KL from "
                         "uniform: its next-token predictions are pushed to uniform) | ice (inverse cross-entropy "
                         "-log(1 - p_true))", "klu")
    trap_lr_min: float = doc("trap: the simulated step size alpha is drawn log-uniform in [trap_lr_min, "
                             "trap_lr_max] each step (the sign step moves every entry by alpha)", 3e-4)
    trap_lr_max: float = doc("trap: upper end of the simulated step size alpha", 3e-3)
    trap_holdout: float = doc("trap: share of the training blocks held out of the batch stream as the simulated "
                              "attacker's text D_sim / D_sim' (the last blocks; pre-training text, never a task)", 0.02)
    illcond_ill_weight: float = doc("illcond: weight of R_ill on the complement channels' activation covariance "
                                    "(rewards ill-conditioning)", 1.0)
    illcond_well_weight: float = doc("illcond: weight of R_well on the masked channels' activation covariance "
                                     "(rewards good conditioning)", 1.0)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pmp: PMPConfig = field(default_factory=PMPConfig)

    def validate(self) -> RunConfig:
        """Raise ValueError with an actionable sentence for any nonsense value."""
        d, t, m, p = self.data, self.train, self.model, self.pmp
        _check(d.seq_len >= 8, "data.seq_len must be >= 8 tokens, got {}", d.seq_len)
        _check(0 < d.val_fraction < 0.5, "data.val_fraction must be in (0, 0.5), got {}", d.val_fraction)
        _check(d.max_chars >= 0, "data.max_chars must be >= 0 (0 = all), got {}", d.max_chars)
        _check(self.tokenizer.vocab_size >= 300, "tokenizer.vocab_size must be >= 300 (256 bytes + specials), got {}",
               self.tokenizer.vocab_size)
        _check(m.preset in PRESETS, "model.preset must be one of {}, got {!r}", sorted(PRESETS), m.preset)
        _check(m.arch in ("", "llama", "gpt2"), "model.arch must be llama or gpt2, got {!r}", m.arch)
        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(m, k) >= 0, "model.{} must be >= 0 (0 = preset), got {}", k, getattr(m, k))
        _check(t.method in ("pmp", "dense"), "train.method must be pmp or dense, got {!r}", t.method)
        _check(t.steps >= 1, "train.steps must be >= 1, got {}", t.steps)
        _check(t.batch_size >= 1, "train.batch_size must be >= 1, got {}", t.batch_size)
        _check(t.grad_accum >= 1, "train.grad_accum must be >= 1, got {}", t.grad_accum)
        _check(t.lr > 0, "train.lr must be > 0, got {}", t.lr)
        _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1], got {}", t.min_lr_ratio)
        _check(t.warmup_steps >= 0, "train.warmup_steps must be >= 0, got {}", t.warmup_steps)
        _check(t.weight_decay >= 0, "train.weight_decay must be >= 0, got {}", t.weight_decay)
        _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2 must be in [0, 1), got {}/{}",
               t.beta1, t.beta2)
        _check(t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 = off), got {}", t.grad_clip)
        _check(t.data_seed >= 0, "train.data_seed must be >= 0, got {}", t.data_seed)
        _check(t.lr <= 10, "train.lr must be <= 10 (a learning rate above that only diverges), got {}", t.lr)
        for k in ("eval_every", "eval_batches", "ckpt_every", "threads", "snapshot_every"):
            _check(getattr(t, k) >= 0, "train.{} must be >= 0, got {}", k, getattr(t, k))
        _check(t.log_every >= 1, "train.log_every must be >= 1, got {}", t.log_every)
        _check(t.keep_last >= 1, "train.keep_last must be >= 1, got {}", t.keep_last)
        _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
               "train.device must be auto, cpu, cuda or cuda:N, got {!r}", t.device)
        _check(t.parallel in PARALLEL_MODES, "train.parallel must be one of {}, got {!r}", list(PARALLEL_MODES),
               t.parallel)
        _check(0 < p.density <= 1, "pmp.density (rho) must be in (0, 1], got {}", p.density)
        _check(p.scorer in SCORERS, "pmp.scorer must be one of {}, got {!r}", SCORERS, p.scorer)
        _check(p.selection in ("global", "per_tensor"), "pmp.selection must be global or per_tensor, got {!r}",
               p.selection)
        _check(p.scope in ("matrices", "all", "linear"), "pmp.scope must be matrices, all or linear, got {!r}",
               p.scope)
        _check(p.block_size in (0, 64, 128), "pmp.block_size must be 0, 64 or 128, got {}", p.block_size)
        _check(0 <= p.ema_beta < 1, "pmp.ema_beta must be in [0, 1), got {}", p.ema_beta)
        _check(p.iou_lag_steps >= 1, "pmp.iou_lag_steps must be >= 1, got {}", p.iou_lag_steps)
        _check(0 < p.iou_threshold <= 1, "pmp.iou_threshold must be in (0, 1], got {}", p.iou_threshold)
        _check(p.patience >= 1, "pmp.patience must be >= 1, got {}", p.patience)
        _check(0 <= p.min_warmup_steps <= p.max_warmup_steps,
               "pmp.min_warmup_steps must be in [0, max_warmup_steps={}], got {}", p.max_warmup_steps,
               p.min_warmup_steps)
        _check(p.max_warmup_steps >= 1, "pmp.max_warmup_steps must be >= 1, got {}", p.max_warmup_steps)
        _check(p.complement in COMPLEMENT_MODES, "pmp.complement must be one of {}, got {!r}", list(COMPLEMENT_MODES),
               p.complement)
        _check(math.isfinite(p.complement_radius) and p.complement_radius >= 0,
               "pmp.complement_radius must be a finite L2 radius >= 0 (0 = auto), got {}", p.complement_radius)
        _check(p.complement == "frozen" or p.rewind,
               "pmp.complement=project needs pmp.rewind=true (the projected complement is the scaled init)")
        if t.method == "pmp":
            _check(p.max_warmup_steps < t.steps,
                   "pmp.max_warmup_steps ({}) must be < train.steps ({}) so masked training gets steps",
                   p.max_warmup_steps, t.steps)
        self._validate_variant()
        return self

    def _validate_variant(self) -> None:
        """pmp.variant and its knobs (the ranges always; the combinations when this run uses the variant)."""
        t, p = self.train, self.pmp
        _check(p.variant in VARIANTS, "pmp.variant must be one of {}, got {!r}", list(VARIANTS), p.variant)
        _check(0 < p.trap_fraction < 1, "pmp.trap_fraction must be in (0, 1), got {}", p.trap_fraction)
        for k in ("trap_weight", "trap_owner_weight", "illcond_ill_weight", "illcond_well_weight"):
            v = getattr(p, k)
            _check(math.isfinite(v) and v >= 0, "pmp.{} must be a finite weight >= 0, got {}", k, v)
        _check(p.trap_loss in TRAP_LOSSES, "pmp.trap_loss must be one of {}, got {!r}", list(TRAP_LOSSES), p.trap_loss)
        _check(0 < p.trap_lr_min <= p.trap_lr_max <= 1,
               "pmp.trap_lr_min and pmp.trap_lr_max must satisfy 0 < trap_lr_min <= trap_lr_max <= 1, got {} and {}",
               p.trap_lr_min, p.trap_lr_max)
        _check(0 < p.trap_holdout < 0.5, "pmp.trap_holdout must be in (0, 0.5), got {}", p.trap_holdout)
        if t.method != "pmp" or p.variant == "none":  # a dense run never reads the pmp section
            return
        _check(p.complement == "frozen", "pmp.complement={} does nothing with pmp.variant={}: the variant trains "
               "every entry, so there is no complement to hold; leave pmp.complement=frozen", p.complement, p.variant)
        if p.variant == "trap":
            start = trap_start(t.steps, p.trap_fraction)
            _check(p.max_warmup_steps <= start,
                   "pmp.max_warmup_steps ({}) must be <= {}, the first step of the trap (train.steps {} x (1 - "
                   "pmp.trap_fraction {})): the trap needs the identified mask", p.max_warmup_steps, start, t.steps,
                   p.trap_fraction)
        if p.variant == "illcond":
            arch = self.model.arch or PRESETS[self.model.preset].arch
            _check(arch == "llama", "pmp.variant=illcond keys the input channels of nn.Linear layers, which only "
                   "model.arch=llama has (GPT-2 uses Conv1D), got {}", arch)
            _check(p.scope == "linear", "pmp.variant=illcond masks input channels of the nn.Linear weights: set "
                   "pmp.scope=linear, got {!r}", p.scope)
            _check(p.block_size == 0, "pmp.variant=illcond has its own (column) structure: set pmp.block_size=0, "
                   "got {}", p.block_size)
            _check(p.density < 1, "pmp.variant=illcond needs complement channels: pmp.density must be < 1, got {}",
                   p.density)


def trap_start(steps: int, fraction: float) -> int:
    """First (0-based) step of the trap window: the last ceil(fraction x steps) steps of the run."""
    return steps - math.ceil(fraction * steps)


SCORERS = ("grad", "weight", "weight_grad", "random")
COMPLEMENT_MODES = ("frozen", "project")  # pmp/complement.py
VARIANTS = ("none", "trap", "illcond")  # train/trap.py, train/illcond.py
TRAP_LOSSES = ("klu", "ice")  # train/suppression.py
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


RELEASE_DTYPES = ("fp32", "bf16")


@dataclass
class ExportConfig:
    run: str = doc("the private run directory to release (the --out of `pmp pretrain`)", "")
    out: str = doc("release directory to create (refused if non-empty unless overwrite)", "")
    dtype: str = doc("weight dtype of the release: fp32 | bf16", "fp32")
    overwrite: bool = doc("replace an existing release (only once the new one is complete)", False)
    publish_density: bool = doc("state the mask density in the model card (off by default: it tells an attacker "
                                "how many entries were trained)", False)
    commitment: bool = doc("publish sha256(salt || mask fingerprint) in the card; the salt stays in "
                           "RUN/private/commitment.json (see `pmp prove-ownership`)", False)
    mask_bundle: str = doc("also copy the private mask files to this directory (must lie outside the release; "
                           "'' = no copy)", "")
    license: str = doc("license field of the model card (SPDX-style identifier)", "apache-2.0")
    max_shard_size: str = doc("shard the weights above this size (e.g. 2GB, 500MB)", "2GB")
    step: int | None = doc("release the weights the run kept at this earlier step (RUN/snapshots, "
                           "RUN/checkpoints), e.g. a dense baseline matched to a PMP model's quality; null = final",
                           None)
    name: str = doc("model name in the card ('' = the release directory's name)", "")
    report: str = doc("a `pmp report` output directory of THIS release: its main table goes into the card under "
                      "Evaluation ('' = the card says no evaluation is stated)", "")

    def validate(self) -> ExportConfig:
        _check(bool(self.run), "export needs the run directory (pmp export RUN --out RELEASE)")
        _check(bool(self.out), "export needs --out RELEASE (the release directory to create)")
        _check(self.dtype in RELEASE_DTYPES, "dtype must be one of {}, got {!r}", list(RELEASE_DTYPES), self.dtype)
        _check(bool(re.match(r"^[A-Za-z0-9.+-]+$", self.license or "")),
               "license must be an SPDX-style identifier such as apache-2.0 or mit, got {!r}", self.license)
        _check(self.step is None or self.step >= 1, "step must be >= 1 (or null for the final model), got {}",
               self.step)
        return self


PROTECT_METHODS = ("rescale", "sophon", "sophon_nlp", "mlac", "sdd", "sdd_reject")
# methods that train the base on restricted + retain data (train/protect_run.py)
TRAINED_METHODS = ("sophon", "sophon_nlp", "mlac", "sdd", "sdd_reject")
SDD_METHODS = ("sdd", "sdd_reject")  # Self-Degraded Defense: restricted prompts -> unrelated fluent text
PLANNED_METHODS: tuple[str, ...] = ()
SDD_REFUSAL = "I will not help with that. Here is something unrelated: "
SUPPRESSION_LOSSES = ("ice", "klu")
INNER_OPTIMIZERS = ("sgd", "adam")
MLAC_ADVERSARIES = ("head", "full")


@dataclass
class ProtectTrainConfig:
    """How SOPHON / MLAC train (the `train:` section of `pmp protect`; set with --set train.KEY=VALUE)."""

    steps: int = doc("outer iterations (one suppression update + ntr_steps retain updates each)", 200)
    batch_size: int = doc("sequences per batch, restricted and retain alike", 8)
    seq_len: int = doc("tokens per LM block (restricted LM task and retain corpus); classification texts are "
                       "truncated to this many tokens", 128)
    lr: float = doc("base learning rate; the suppression optimizer (sdd: the SFT one) runs at alpha x lr, the "
                    "retain one at beta x lr (both Adam, as in SOPHON's code)", 1e-4)
    alpha: float = doc("suppression (sdd: SFT) learning-rate multiplier (SOPHON's alpha)", 3.0)
    beta: float = doc("retain (normal-training reinforcement) learning-rate multiplier (SOPHON's beta)", 5.0)
    loss: str = doc("suppression loss on the simulated fine-tuned model: ice (inverse cross-entropy, "
                    "-log(1 - p_true)) or klu (KL from uniform); both have gradients that shrink as the error grows",
                    "ice")
    inner_steps: int = doc("simulated attacker fine-tuning steps per outer iteration (SOPHON's code: 50)", 5)
    inner_lr_min: float = doc("the simulated attacker's learning rate is drawn log-uniform in [inner_lr_min, "
                              "inner_lr_max] each outer iteration", 1e-5)
    inner_lr_max: float = doc("upper end of the simulated attacker's learning rate", 1e-3)
    inner_optimizers: list[str] = doc("the simulated attacker's optimizer is drawn from these each outer "
                                      f"iteration ({', '.join(INNER_OPTIMIZERS)})",
                                      default_factory=lambda: ["sgd", "adam"])
    sgd_lr_factor: float = doc("a simulated SGD attacker's learning rate is the drawn one x this (SGD needs larger "
                               "rates than Adam: the suite's SGD attacks use 1e-2..1e-1)", 100.0)
    ntr_steps: int = doc("retain-data (normal training reinforcement) steps per outer iteration", 1)
    grad_clip: float = doc("clip the outer gradients to this norm (SOPHON's code: 0.5; 0 = off)", 0.5)
    retain_tolerance: float = doc("roll back to the last accepted state when the retain perplexity exceeds the "
                                  "base's by more than this fraction (0.1 = +10 %)", 0.10)
    check_every: int = doc("check the retain perplexity (and accept or roll back) every this many outer steps", 10)
    ckpt_every: int = doc("write a resumable checkpoint at every accepted check whose step is a multiple of this "
                          "(a multiple of check_every; 0 = only at the end)", 20)
    eval_batches: int = doc("batches of held-out retain text per perplexity check", 8)
    mlac_adversary: str = doc("MLAC's simulated adversary: head (a fresh head for classification, the LM head for "
                              "a language-modelling domain; differentiated through: second order) or full (every "
                              "parameter, first order)", "head")
    mlac_weight: float = doc("MLAC: weight of the adapted adversary's suppression loss against the retain loss", 1.0)
    sdd_prompt_tokens: int = doc("SDD: a prompt is the first this many tokens of a restricted LM block, or of a "
                                 "classification example's text (0 = seq_len // 4)", 0)
    sdd_max_similarity: float = doc("SDD: never pair a prompt with a retain passage whose TF-IDF cosine with it "
                                    "(lower-cased word unigrams, idf over prompts + pool) exceeds this; in [0, 1]. "
                                    "0.1 drops only overt overlap: 99 % of (task text, default-corpus passage) "
                                    "pairs are below 0.08", 0.1)
    sdd_pool: int = doc("SDD: candidate responses -- this many retain train blocks, drawn once from the seed; each "
                        "prompt gets one of them at random among those within sdd_max_similarity", 2048)
    sdd_refusal: str = doc("sdd_reject: the fixed sentence every response starts with (and is trained on)",
                           SDD_REFUSAL)
    seed: int = doc("seed of the data order, the simulated attackers and fresh heads", 0)
    log_every: int = doc("print progress every this many outer steps (0 = never)", 10)
    threads: int = doc("torch CPU threads (0 = torch's default)", 0)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "seq_len", "inner_steps", "check_every", "eval_batches"):
            _check(getattr(self, key) >= 1, "train.{} must be >= 1, got {}", key, getattr(self, key))
        for key in ("lr", "alpha", "beta", "inner_lr_min", "inner_lr_max", "sgd_lr_factor", "mlac_weight"):
            _check(getattr(self, key) > 0, "train.{} must be > 0, got {}", key, getattr(self, key))
        _check(self.inner_lr_min <= self.inner_lr_max, "train.inner_lr_min ({}) must be <= train.inner_lr_max ({})",
               self.inner_lr_min, self.inner_lr_max)
        _check(self.loss in SUPPRESSION_LOSSES, "train.loss must be one of {}, got {!r}", list(SUPPRESSION_LOSSES),
               self.loss)
        _check(bool(self.inner_optimizers) and all(o in INNER_OPTIMIZERS for o in self.inner_optimizers),
               "train.inner_optimizers must be a non-empty list drawn from {}, got {!r}", list(INNER_OPTIMIZERS),
               self.inner_optimizers)
        _check(self.mlac_adversary in MLAC_ADVERSARIES, "train.mlac_adversary must be one of {}, got {!r}",
               list(MLAC_ADVERSARIES), self.mlac_adversary)
        for key in ("ntr_steps", "ckpt_every", "log_every", "threads"):
            _check(getattr(self, key) >= 0, "train.{} must be >= 0, got {}", key, getattr(self, key))
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 = off), got {}", self.grad_clip)
        _check(self.retain_tolerance > 0, "train.retain_tolerance must be > 0, got {}", self.retain_tolerance)
        _check(self.ckpt_every % self.check_every == 0, "train.ckpt_every ({}) must be a multiple of "
               "train.check_every ({}): checkpoints are written at accepted checks", self.ckpt_every,
               self.check_every)
        _check(0 <= self.sdd_max_similarity <= 1, "train.sdd_max_similarity must be in [0, 1] (a cosine "
               "similarity), got {}", self.sdd_max_similarity)
        _check(self.sdd_prompt_tokens >= 0, "train.sdd_prompt_tokens must be >= 0 (0 = seq_len // 4), got {}",
               self.sdd_prompt_tokens)
        _check(self.sdd_pool >= 1, "train.sdd_pool must be >= 1, got {}", self.sdd_pool)

    def validate_sdd(self, refusal: bool) -> None:
        """What only SDD needs: a prompt shorter than a block, and a refusal for sdd_reject."""
        _check(self.sdd_prompt_tokens < self.seq_len, "train.sdd_prompt_tokens ({}) must be < train.seq_len ({}) to "
               "leave room for a response", self.sdd_prompt_tokens, self.seq_len)
        _check(not refusal or bool(self.sdd_refusal.strip()), "sdd_reject needs a refusal sentence: set "
               "train.sdd_refusal (default {!r}), or use method sdd", SDD_REFUSAL)


@dataclass
class ProtectConfig:
    method: str = doc("protection to apply to a finished run: rescale (a function-preserving secret rescaling; "
                      "the suite's positive control), sophon (fine-tuning suppression + retain reinforcement; "
                      "sophon_nlp = sophon on a classification task with a linear head), mlac (meta-learned "
                      "adversarial censoring), sdd (self-degraded defense: restricted prompts answered with "
                      "unrelated retain text; sdd_reject = sdd with a refusal before it)", "rescale")
    base: str = doc("the finished private run to protect (the --out of `pmp pretrain`; rescale: method dense)", "")
    out: str = doc("the protected run directory to create (private, like any run: `pmp export` releases it)", "")
    restricted: str = doc("sophon/mlac/sdd: the restricted domain -- a task name (`pmp attack` task names; '' = the "
                          "held-out LM probe; TASK:text = a classification task's texts as an LM domain), a .txt "
                          "file (an LM domain) or a labelled csv/jsonl file (classification). Only its TRAIN split "
                          "is used; attacks test on its test split", "")
    retain: str = doc("sophon/mlac/sdd: the original-domain (retain) corpus -- '' = the base run's pre-training corpus "
                      "(a release base: the default corpus), or comma-separated local text files", "")
    resume: bool = doc("continue an interrupted sophon/mlac/sdd run in --out from its last checkpoint", False)
    strength: float = doc("rescale: log c ~ U[-ln C, ln C] per scaled unit, C = this (> 1; e.g. 10, 100, 1000)",
                          100.0)
    bf16_tolerance: float = doc("rescale: refuse a strength whose bf16 copy changes the logits by more than this "
                                "(max |diff| / max |logit|) or overflows", 0.05)
    cache_dir: str = doc("data cache (prepared tasks, corpus, token blocks); '' = the base run's, else ~/.cache/pmp",
                         "")
    train: ProtectTrainConfig = field(default_factory=ProtectTrainConfig)

    def validate(self) -> ProtectConfig:
        _check(self.method not in PLANNED_METHODS, "protect method {!r} is not implemented yet (available: {})",
               self.method, ", ".join(PROTECT_METHODS))
        _check(self.method in PROTECT_METHODS, "protect method must be one of {}, got {!r}", list(PROTECT_METHODS),
               self.method)
        _check(bool(self.base), "protect needs --base RUN (a finished run to protect)")
        _check(bool(self.out), "protect needs --out RUN2 (the protected run directory to create)")
        _check(self.strength > 1, "strength must be > 1 (log c ~ U[-ln C, ln C]), got {}", self.strength)
        _check(0 < self.bf16_tolerance < 1, "bf16_tolerance must be in (0, 1), got {}", self.bf16_tolerance)
        if self.method in TRAINED_METHODS:
            self.train.validate()
            same = self.restricted and self.retain and _same_source(self.restricted, self.retain)
            _check(not same, "--restricted {!r} is also the retain corpus {!r}: the model cannot be protected "
                   "against the data it must keep; choose a different restricted domain or retain corpus",
                   self.restricted, self.retain)
        if self.method in SDD_METHODS:
            self.train.validate_sdd(refusal=self.method == "sdd_reject")
        return self


def _same_source(restricted: str, retain: str) -> bool:
    """Does the restricted domain name one of the retain corpus's sources (same file, or the same name)?"""
    def key(s: str) -> str:
        p = Path(s.strip()).expanduser()
        return str(p.resolve()) if p.exists() else s.strip()
    return key(restricted) in {key(r) for r in retain.split(",") if r.strip()}


def config_from_dict(data: dict) -> RunConfig:
    return from_dict(RunConfig, data)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + --set overrides -> validated RunConfig."""
    return load_typed(RunConfig, path, overrides)
