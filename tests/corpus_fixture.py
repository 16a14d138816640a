"""A tiny generated corpus with real structure (a small grammar), so losses fall fast in tests."""

import random

SUBJECTS = ["the captain", "my sister", "a sailor", "the old man", "her father", "the doctor", "our neighbour"]
VERBS = ["walked to", "looked at", "spoke of", "thought about", "returned to", "wrote to", "laughed at"]
OBJECTS = ["the harbour", "the letter", "the garden", "the house", "the ship", "the village", "the storm"]
ENDINGS = ["in the morning", "before dinner", "with great care", "without a word", "at last", "once more"]


def generate_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        para = " ".join(
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
            for _ in range(rng.randint(3, 7))
        )
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out)


def write_corpus(directory, n_files: int = 4, chars_per_file: int = 6000) -> str:
    """Write n_files text files; return the comma-separated list for data.corpus."""
    paths = []
    for i in range(n_files):
        p = directory / f"book{i}.txt"
        p.write_text(generate_text(chars_per_file, seed=i))
        paths.append(str(p))
    return ",".join(paths)
