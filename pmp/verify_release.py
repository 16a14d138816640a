"""Audit a public release directory: stock files only, stock loading, and nothing derived from the private mask.

`verify_release(release)` checks what anyone can check: the file list, file names, safetensors metadata, the
config and generation-config keys against the stock config class, the tokenizer config, the model card, and a
load with stock `transformers` in a subprocess that never imports pmp. With the owner's private run directory
(`run_dir`) it also scans every byte of every file -- subdirectories included, though a release is flat and the
file-list check refuses any directory -- for the packed mask bits (per tensor, in 32-byte chunks), the mask
fingerprint, the init seed, the commitment salt and the private run's path.

The byte scan finds the mask only in the encoding the run stores it in (bit-packed int32 words); a leak in
another encoding (one byte per entry, a different bit order, compressed) is not detected.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig

from pmp.run_dir import RunDir

RELEASE_FILE_RE = re.compile(
    r"^(config\.json|generation_config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
    r"chat_template\.jinja|chat_template\.json|README\.md)$"
)
REQUIRED_FILES = ("config.json", "tokenizer_config.json", "README.md")
# Words that must never appear in a config key (mask-derived or run-specific fields) ...
FORBIDDEN_KEY_WORDS = ("mask", "pmp", "seed", "density", "rho", "private")
# ... and in a file name.
FORBIDDEN_NAME_WORDS = ("mask", "private", "init", "seed")
# Keys save_pretrained writes beside the config class's own fields.
EXTRA_CONFIG_KEYS = {"architectures", "transformers_version", "dtype", "_name_or_path"}
INDEX_METADATA_KEYS = {"total_size", "total_parameters"}
CHUNK = 32  # bytes of packed mask per needle: 256 mask entries; any leaked run of >= 63 bytes holds one
SCAN_BLOCK = 64 << 20  # bytes of a file held in memory at once by the mask scan


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:4s}  {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass
class VerifyReport:
    release: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "FAIL"]

    def add(self, name: str, problems: list[str], ok_detail: str = "") -> None:
        self.checks.append(Check(name, "FAIL", "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
                           if problems else Check(name, "PASS", ok_detail))

    def __str__(self) -> str:
        lines = [f"verify-release {self.release}"] + [c.line() for c in self.checks]
        lines.append("OK: no failed check" if self.ok else f"FAILED: {', '.join(self.failed())}")
        return "\n".join(lines)


def verify_release(release_dir: str | Path, run_dir: str | Path | None = None, load: bool = True) -> VerifyReport:
    """Run every check on `release_dir` (and the private scans when `run_dir` is given); never raises on a
    failed check, only on a missing directory. `load=False` skips the (slower) stock-load subprocess."""
    release = Path(release_dir)
    if not release.is_dir():
        raise FileNotFoundError(f"release directory {release} does not exist")
    report = scan_release(release, run_dir)
    if load:
        report.add("stock load in a subprocess without pmp", _load_check(release),
                   "AutoModelForCausalLM + AutoTokenizer load, key set = fresh stock model's, pmp never imported")
    return report


def scan_release(release: Path, run_dir: str | Path | None = None) -> VerifyReport:
    """The static checks (everything but the load subprocess); `export_release` runs them before publishing."""
    report = VerifyReport(Path(release))
    files = sorted(release.iterdir())
    nested = sorted(release.rglob("*"))
    report.add("expected files only", _file_list_problems(files, release), ", ".join(p.name for p in files))
    report.add("file names free of mask/private/init/seed",
               [_rel(p, release) for p in nested if any(w in p.name.lower() for w in FORBIDDEN_NAME_WORDS)])
    report.add("safetensors metadata is exactly {format: pt}", _safetensors_problems(release))
    report.add("config.json has stock keys only", _config_problems(release / "config.json"))
    report.add("generation_config.json has stock keys only", _generation_config_problems(release))
    report.add("tokenizer config free of run-specific fields", _tokenizer_config_problems(release))
    report.add("model card", _card_problems(release / "README.md"))
    if run_dir is not None:
        _private_scans(report, release, Path(run_dir))
    return report


# ---------------------------------------------------------------------------------------------- public checks
def _rel(path: Path, release: Path) -> str:
    """`path` relative to the release, as the reports name it (directories with a trailing /)."""
    return path.relative_to(release).as_posix() + ("/" if path.is_dir() else "")


def _file_list_problems(files: list[Path], release: Path) -> list[str]:
    problems = [f"releases are flat: unexpected directory {_rel(p, release)}" for p in files if p.is_dir()]
    problems += [f"unexpected file {p.name}" for p in files if not p.is_dir() and not RELEASE_FILE_RE.match(p.name)]
    names = {p.name for p in files}
    problems += [f"missing {n}" for n in REQUIRED_FILES if n not in names]
    if not any(n.endswith(".safetensors") for n in names):
        problems.append("no safetensors weights")
    shards = [n for n in names if re.match(r"model-\d{5}-of-\d{5}\.safetensors$", n)]
    if shards and "model.safetensors.index.json" not in names:
        problems.append("sharded weights without model.safetensors.index.json")
    return problems


def _safetensors_problems(release: Path) -> list[str]:
    problems, keys = [], {}
    for f in sorted(release.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as s:
                meta = s.metadata()
                keys.update({k: f.name for k in s.keys()})
        except Exception as e:  # noqa: BLE001 - unreadable weights are a failed check, not a crash
            problems.append(f"{f.name} cannot be read ({e})")
            continue
        if meta != {"format": "pt"}:
            problems.append(f"{f.name} metadata {sorted((meta or {}).keys())} (only 'format': 'pt' allowed)")
    index = release / "model.safetensors.index.json"
    if index.is_file():
        try:
            idx = json.loads(index.read_text())
        except ValueError as e:
            return problems + [f"{index.name} is not JSON ({e})"]
        if set(idx) - {"metadata", "weight_map"}:
            problems.append(f"{index.name} has extra top-level keys {sorted(set(idx) - {'metadata', 'weight_map'})}")
        if set(idx.get("metadata", {})) - INDEX_METADATA_KEYS:
            problems.append(f"{index.name} metadata has keys {sorted(set(idx['metadata']) - INDEX_METADATA_KEYS)}")
        if idx.get("weight_map", {}) != keys:
            problems.append(f"{index.name} weight_map does not match the tensors in the shards")
    return problems


def _path_like(value) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or "\\" in value
                                       or re.match(r"^[A-Za-z]:/", value) is not None)


def _json_problems(path: Path, allowed: set[str] | None, words: tuple[str, ...] = FORBIDDEN_KEY_WORDS,
                   check_values: bool = True) -> list[str]:
    if not path.is_file():
        return []
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        return [f"{path.name} is not JSON ({e})"]
    problems = []
    for k, v in obj.items():
        if any(w in k.lower() for w in words):
            problems.append(f"{path.name}: field {k!r} looks mask- or run-derived")
        elif allowed is not None and k not in allowed:
            problems.append(f"{path.name}: field {k!r} is not a field of the stock config")
        if _path_like(v) or (check_values and isinstance(v, str) and any(w in v.lower() for w in words)):
            problems.append(f"{path.name}: field {k!r} holds {v!r} (a path or a mask/run-derived value)")
    return problems


def stock_config_keys(model_type: str) -> set[str]:
    return set(AutoConfig.for_model(model_type).to_dict()) | EXTRA_CONFIG_KEYS


def _config_problems(path: Path) -> list[str]:
    if not path.is_file():
        return ["no config.json"]
    try:
        model_type = json.loads(path.read_text()).get("model_type", "")
        allowed = stock_config_keys(model_type)
    except (ValueError, KeyError) as e:
        return [f"config.json: unknown or unreadable model_type ({e})"]
    return _json_problems(path, allowed)


def _generation_config_problems(release: Path) -> list[str]:
    return _json_problems(release / "generation_config.json", set(GenerationConfig().to_dict()))


def _tokenizer_config_problems(release: Path) -> list[str]:
    # Tokenizer configs are open-ended and may legitimately name a `mask_token`: only run-specific keys and
    # path values are refused here.
    problems = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        problems += _json_problems(release / name, None, ("pmp", "seed", "density", "private"), check_values=False)
    return problems


def _card_problems(path: Path) -> list[str]:
    if not path.is_file():
        return ["no README.md"]
    text = path.read_text(errors="replace")
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not m:
        return ["README.md has no YAML front matter"]
    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"README.md front matter is not YAML ({e})"]
    problems = [f"front matter lacks {k}: {v}" for k, v in
                (("library_name", "transformers"), ("pipeline_tag", "text-generation")) if front.get(k) != v]
    if not front.get("license"):
        problems.append("front matter lacks license")
    return problems


def _load_check(release: Path) -> list[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # -I: isolated mode, no cwd / PYTHONPATH on sys.path; the script imports transformers and nothing of ours.
    proc = subprocess.run([sys.executable, "-I", "-c", STOCK_LOAD_SCRIPT, str(release.resolve())], env=env,
                          capture_output=True, text=True, timeout=900, cwd=str(release.resolve().parent))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"stock loading failed (exit {proc.returncode}): {tail}"]
    res = json.loads(lines[-1][len("RESULT "):])
    problems = [f"loading info {k}: {v[:3]}" for k, v in res["loading_info"].items()]
    if res["missing"]:
        problems.append(f"{len(res['missing'])} keys of a fresh stock model are missing, e.g. {res['missing'][0]}")
    if res["extra"]:
        problems.append(f"{len(res['extra'])} keys a fresh stock model lacks, e.g. {res['extra'][0]}")
    if not res["loaded_keys_equal"]:
        problems.append("the loaded model's state_dict keys differ from a fresh stock model's")
    if not res["finite"]:
        problems.append("logits are not finite")
    if res["pmp_imported"]:
        problems.append("pmp was imported while loading")
    return problems


# Runs in a fresh interpreter: stock transformers only.
STOCK_LOAD_SCRIPT = r"""
import glob, json, os, sys
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
tok = AutoTokenizer.from_pretrained(d)
config = AutoConfig.from_pretrained(d)
with torch.device("meta"):
    fresh = AutoModelForCausalLM.from_config(config)
fresh_keys, seen, tied = set(fresh.state_dict()), {}, set()
for n, p in fresh.named_parameters(remove_duplicate=False):
    tied.add(n) if id(p) in seen else seen.setdefault(id(p), n)
file_keys = set()
for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
    with safe_open(f, "pt") as s:
        file_keys |= set(s.keys())
ids = tok("The release loads with stock code.", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
print("RESULT " + json.dumps({
    "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
    "missing": sorted(fresh_keys - file_keys - tied), "extra": sorted(file_keys - fresh_keys),
    "loaded_keys_equal": set(model.state_dict()) == fresh_keys, "finite": bool(torch.isfinite(logits).all()),
    "pmp_imported": any(m == "pmp" or m.startswith("pmp.") for m in sys.modules)}))
"""


# ---------------------------------------------------------------------------------------------- private scans
def _private_scans(report: VerifyReport, release: Path, run_root: Path) -> None:
    run = RunDir(run_root)
    if not run.is_run():
        raise FileNotFoundError(f"--private {run_root} is not a pmp run directory (no run.json)")
    files = release_files(release)
    if run.has_mask():
        mask = run.load_mask()
        needles, skipped = mask_needles(mask)
        hits = scan_for_chunks(files, needles, release)
        report.add("no packed mask bytes in any file", hits,
                   f"{len(needles)} chunks of {len(mask.layouts) - len(skipped)} tensors searched"
                   + (f"; {len(skipped)} tensors too short or (nearly) uniform to search" if skipped else ""))
        fp = mask.fingerprint()
        report.add("no mask fingerprint in any file",
                   _find_literals(files, {"fingerprint hex": [fp.encode(), fp.upper().encode()],
                                          "fingerprint bytes": [bytes.fromhex(fp)]}, release))
    else:
        report.checks.append(Check("mask scans", "SKIP", "the run has no mask (dense baseline)"))
    seed = run.init_seed()
    if seed is not None:
        if seed < 10**7:
            report.checks.append(Check("no init seed in any file", "SKIP",
                                       f"the pinned seed {seed} is too short to search for (it occurs by chance)"))
        else:
            report.add("no init seed in any file", _find_literals(files, {"init seed": [
                str(seed).encode(), f"{seed:x}".encode(), f"{seed:X}".encode(),
                *(seed.to_bytes(n, order) for n in (8, 16) if seed < 2 ** (8 * n - 1) for order in ("little", "big"))
            ]}, release))
    if run.rescale_key.is_file():  # the secret scales of a `pmp protect rescale` run, as stored
        raw = run.rescale_key.read_bytes()
        data = raw[8 + int.from_bytes(raw[:8], "little"):]  # skip the safetensors header: names are generic
        pieces = [data[i:i + 32] for i in range(0, max(len(data) - 32, 0), max(len(data) // 16, 32))]
        report.add("no rescale key bytes in any file", _find_literals(files, {"rescale key": pieces}))
    if run.commitment.is_file():
        salt = json.loads(run.commitment.read_text())["salt"]
        report.add("no commitment salt in any file",
                   _find_literals(files, {"salt": [salt.encode(), salt.upper().encode(), bytes.fromhex(salt)]},
                                  release))
    path_forms = {str(run_root), str(run_root.resolve())}
    report.add("no private run path in any file",
               _find_literals(files, {"private run path": [p.encode() for p in path_forms if len(p) > 4]}, release))


def release_files(release: Path) -> list[Path]:
    """Every file under the release, subdirectories included (the file-list check refuses those, but whatever a
    wrong --out left in one is scanned too). Symlinked directories are not followed (no loops)."""
    return [p for p in sorted(release.rglob("*")) if p.is_file()]


def mask_needles(mask) -> tuple[list[tuple[str, bytes, int, int]], list[str]]:
    """(tensor, chunk, key offset, 8-byte key as uint64) for every informative CHUNK-byte piece of the packed
    mask. Tensors whose packed bytes are shorter than 16, or all (or nearly all) 0x00 / 0xFF so that no 8-byte key
    has 3 distinct byte values, are skipped: such byte strings can occur by chance (zero runs in weights)."""
    needles, skipped = [], []
    for name in sorted(mask.layouts):
        b = mask.layouts[name].packed_bytes().cpu().numpy().tobytes()
        if len(b) < 16 or b.count(0) == len(b) or b.count(0xFF) == len(b):
            skipped.append(name)
            continue
        chunks = [b] if len(b) < CHUNK else [b[i:i + CHUNK] for i in range(0, len(b) - CHUNK + 1, CHUNK)]
        if len(b) > CHUNK and len(b) % CHUNK:
            chunks.append(b[-CHUNK:])
        found = 0
        for c in chunks:
            # The 8-byte key indexes the scan; a key of few distinct bytes (runs of 0x00) would hit everywhere.
            off = max(range(0, len(c) - 7, 4), key=lambda k: len(set(c[k:k + 8])))
            if len(set(c[off:off + 8])) >= 3:
                needles.append((name, c, off, int.from_bytes(c[off:off + 8], "little")))
                found += 1
        if not found:
            skipped.append(name)
    return needles, skipped


def scan_for_chunks(files: list[Path], needles: list[tuple[str, bytes, int, int]],
                    root: Path | None = None) -> list[str]:
    """Every (file, tensor) where one of the needles occurs at any byte offset; files are named relative to `root`
    (default: by name). Vectorised: each 8-byte window of the file (8 alignments) is looked up among the sorted
    keys; candidate hits are compared in full."""
    if not needles:
        return []
    keys = np.array(sorted({k for _, _, _, k in needles}), dtype=np.uint64)
    by_key: dict[int, list[tuple[str, bytes, int]]] = {}
    for name, chunk, off, key in needles:
        by_key.setdefault(key, []).append((name, chunk, off))
    hits: list[str] = []
    for path in files:
        size = path.stat().st_size
        if size < 8:
            continue
        data = np.memmap(path, dtype=np.uint8, mode="r")
        found: set[str] = set()
        for start in range(0, size, SCAN_BLOCK):
            block = np.asarray(data[start:min(size, start + SCAN_BLOCK + 8)])
            for a in range(8):
                n = (len(block) - a) // 8
                if n <= 0:
                    continue
                win = np.frombuffer(block.data, dtype="<u8", count=n, offset=a)
                idx = np.minimum(np.searchsorted(keys, win), len(keys) - 1)
                for j in np.nonzero(keys[idx] == win)[0]:
                    pos = start + a + 8 * int(j)
                    for name, chunk, off in by_key[int(win[j])]:
                        lo = pos - off
                        if lo >= 0 and bytes(data[lo:lo + len(chunk)]) == chunk:
                            found.add(name)
        del data
        hits += [f"{_label(path, root)} holds packed mask bytes of {name}" for name in sorted(found)]
    return hits


def _label(path: Path, root: Path | None) -> str:
    return path.relative_to(root).as_posix() if root is not None else path.name


def _find_literals(files: list[Path], literals: dict[str, list[bytes]], root: Path | None = None) -> list[str]:
    hits = []
    for path in files:
        if path.stat().st_size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for what, forms in literals.items():
                if any(mm.find(b) != -1 for b in forms if b):
                    hits.append(f"{_label(path, root)} holds the {what}")
    return hits
