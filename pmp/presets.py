"""Named model shapes. Stock Hugging Face architectures only, so releases load without our code.

`vocab_size` is the nominal vocabulary the parameter counts below assume; the built model always uses the
tokenizer's real vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int = 0  # 0 = same as num_heads (no GQA)
    vocab_size: int = 8192
    max_position: int = 2048
    tie_embeddings: bool = False
    note: str = ""


PRESETS: dict[str, Preset] = {
    # ~1.2 M parameters at vocab 8192: unit tests and the debug recipe.
    "tiny": Preset("llama", 64, 2, 4, 256, note="tests, debug"),
    # ~7.5 M parameters at vocab 8192: the CPU demo (about 4 k tokens/s on 2 cores).
    "small": Preset("llama", 256, 4, 4, 704, note="CPU demo"),
    # ~134 M at vocab 32000 (GPT-2/Pythia-125M class shape).
    "base125m": Preset("llama", 768, 12, 12, 2048, vocab_size=32000, note="GPU"),
    # The TinyLlama-1.1B shape: GQA with 4 KV heads, vocab 32000.
    "tinyllama1b": Preset("llama", 2048, 22, 32, 5632, num_kv_heads=4, vocab_size=32000, note="GPU"),
}
