"""hayate run --image and hayate chat's /image on a tiny random SmolVLM-shaped folder; image
mistakes give one line and exit code 2 (run) or one line and the chat goes on."""
from __future__ import annotations

import builtins

import pytest

from image_samples import encode, noise
from test_cli import assert_usage_error, run_cli
from tiny_models import make_tiny_model
from tiny_vlms import make_tiny_vlm


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-vlm")
    make_tiny_vlm("idefics3", folder)
    return str(folder)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "photo.jpg"
    path.write_bytes(encode(noise((120, 80), seed=3), "JPEG"))
    return str(path)


def test_run_with_an_image_prints_image_timings(capsys, vlm_folder, picture):
    code, out, err = run_cli(capsys, "run", "--model", vlm_folder, "--image", picture, "--max-tokens", "6",
                             "What is in this picture?")
    assert code == 0 and out.strip()
    summary = err.strip().splitlines()[-1]
    assert "1 image (80 tokens): decode" in summary and "preprocess" in summary and "encode" in summary


def test_run_with_a_missing_or_broken_image(capsys, vlm_folder, tmp_path, picture):
    assert_usage_error(capsys, "run", "--model", vlm_folder, "--image", str(tmp_path / "none.png"), "hi",
                       mentions="no such image file")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert_usage_error(capsys, "run", "--model", vlm_folder, "--image", str(broken), "hi", mentions="image")


def test_text_only_model_refuses_an_image(capsys, tmp_path, picture):
    make_tiny_model("llama", tmp_path)
    capsys.readouterr()   # transformers' save progress
    assert_usage_error(capsys, "run", "--model", str(tmp_path), "--image", picture, "hi",
                       mentions="does not accept images")


def test_chat_attaches_images_to_the_next_message(capsys, monkeypatch, vlm_folder, picture):
    lines = iter(["/image /no/such/file.png", f"/image {picture}", "What is it?", "And the colours?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    code, out, err = run_cli(capsys, "chat", "--model", vlm_folder, "--max-tokens", "4")
    assert code == 0
    assert "no such image file" in err and "image 1 attached" in err
    summaries = [line for line in err.splitlines() if "time to first token" in line]
    assert len(summaries) == 2
    # The history keeps the image: the second turn's encoder work comes from the cache.
    assert "1 image" in summaries[0] and "from cache" not in summaries[0]
    assert "1 image" in summaries[1] and "1 from cache" in summaries[1]
