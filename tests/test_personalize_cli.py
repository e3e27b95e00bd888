"""The main job's command line refuses every bad flag combination with an argparse error before any work.

``parse_args`` is called in-process: an argparse error is ``SystemExit(2)`` with the message on stderr. "Before any
work" is checked by pointing ``--cache`` and ``--out`` at fresh paths and asserting nothing was created there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _personalize.cli import build_parser, parse_args  # noqa: E402


def _refused(argv, capsys, tmp_path, pattern):
    cache, out = tmp_path / "cache", tmp_path / "fresh-out"
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, "--cache", str(cache), *([] if "--out" in argv else ["--out", str(out)])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: personalize.py" in err and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not cache.exists() and not out.exists()  # nothing prepared, nothing written


@pytest.fixture
def ckpt(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"not read before the checks")
    return str(f)


def test_checkpoint_without_model(capsys, tmp_path, ckpt):
    _refused(["--checkpoint", ckpt], capsys, tmp_path, r"--checkpoint needs --model")


def test_model_without_checkpoint(capsys, tmp_path):
    _refused(["--model", "vit_tiny_patch16_224"], capsys, tmp_path, r"--model needs --checkpoint")


@pytest.mark.parametrize("flag", [["--split", "dirichlet"], ["--clients", "4"], ["--alpha", "0.5"]])
def test_data_with_digit_split_flags(capsys, tmp_path, ckpt, flag):
    data = tmp_path / "data"
    (data / "a" / "cls").mkdir(parents=True)
    _refused(["--data", str(data), "--model", "vit_tiny_patch16_224", "--checkpoint", ckpt, *flag], capsys, tmp_path,
             re.escape(flag[0]) + r".*only apply to the embedded digits")


@pytest.mark.parametrize("alpha", ["0", "-1", "nan", "inf", "x"])
def test_bad_alpha(capsys, tmp_path, alpha):
    _refused(["--split", "dirichlet", "--alpha", alpha], capsys, tmp_path, r"--alpha")


def test_alpha_without_dirichlet(capsys, tmp_path):
    _refused(["--alpha", "0.3"], capsys, tmp_path, r"--alpha only applies to --split dirichlet")


def test_impossible_dirichlet_split(capsys, tmp_path):
    # 300 clients x 250 images from 5,000 digits: no draw fits
    _refused(["--split", "dirichlet", "--clients", "300"], capsys, tmp_path, r"could not draw a Dir\(0.1\) split")


def test_too_many_domain_clients(capsys, tmp_path):
    # 40 clients x 250 images of 5 classes: each class would need ~1,000 of its ~500 digits
    _refused(["--clients", "40"], capsys, tmp_path, r"need \d+ MNIST images of class \d, there are \d+; use fewer")


@pytest.mark.parametrize("argv, pattern", [
    (["--split", "dirichlet", "--families", "3"], r"--families only applies to --split domain"),
    (["--families", "7"], r"--families: expected 1 to 6"),
    (["--quick", "--smoke"], r"--quick, --smoke and --pilot are different runs"),
    (["--pilot", "--split", "dirichlet"], r"--pilot measures the regime of the embedded shift families"),
    (["--pretrain", "clean"], r"unrecognized arguments: clean"),
    (["--split", "dirichlet", "--methods", "FedVPT,Clustered-FedVPT"], r"Clustered-FedVPT .* needs --split domain"),
    (["--lr-new", "0"], r"--lr-new: expected a finite learning rate"),
    (["--lr-backbone", "nan"], r"--lr-backbone: expected a finite learning rate"),
    (["--evaluate", "train"], r"--evaluate: invalid choice"),
    (["--eval-every", "0"], r"--eval-every: expected a positive integer"),
])
def test_bad_new_flags(capsys, tmp_path, argv, pattern):
    _refused(argv, capsys, tmp_path, pattern)


def test_missing_and_corrupt_mnist_file_is_one_line(capsys, tmp_path, monkeypatch):
    """A missing or corrupt embedded data file: one argparse error naming the file, before any work."""
    import _personalize.data as data

    missing = tmp_path / "gone" / "mnist_5k.csv.gz"
    monkeypatch.setattr(data, "mnist_path", lambda: missing)
    _refused([], capsys, tmp_path, re.escape(str(missing)) + r" is not a file")
    corrupt = tmp_path / "mnist_5k.csv.gz"
    corrupt.write_bytes(b"this is not gzip")
    monkeypatch.setattr(data, "mnist_path", lambda: corrupt)
    _refused([], capsys, tmp_path, re.escape(str(corrupt)) + r" could not be read")
    import gzip

    with gzip.open(corrupt, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    data._mnist_raw.cache_clear()
    _refused([], capsys, tmp_path, r"have shape \(2, 3\), expected \(5000, 785\)")
    data._mnist_raw.cache_clear()


def test_missing_checkpoint(capsys, tmp_path):
    _refused(["--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "nope.pth")], capsys, tmp_path,
             r"is not a file")


def test_unknown_and_non_vit_models(capsys, tmp_path, ckpt):
    _refused(["--model", "vit_tinyy_patch16_224", "--checkpoint", ckpt], capsys, tmp_path,
             r"not a registered timm model")
    _refused(["--model", "resnet18", "--checkpoint", ckpt], capsys, tmp_path,
             r"--model 'resnet18': fedpeft cannot wrap a timm.models.resnet.ResNet")


def test_empty_and_flat_data_folders(capsys, tmp_path, ckpt):
    model = ["--model", "vit_tiny_patch16_224", "--checkpoint", ckpt]
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(["--data", str(empty), *model], capsys, tmp_path, r"is empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "001.png").write_bytes(b"")
    _refused(["--data", str(flat), *model], capsys, tmp_path, r"holds images directly \(a flat folder\)")
    flat_client = tmp_path / "flat_client"
    (flat_client / "amazon").mkdir(parents=True)
    (flat_client / "amazon" / "001.jpg").write_bytes(b"")
    _refused(["--data", str(flat_client), *model], capsys, tmp_path, r"holds images directly, not in class folders")
    _refused(["--data", str(tmp_path / "missing"), *model], capsys, tmp_path, r"is not a folder")


@pytest.mark.parametrize("argv, pattern", [
    (["--rounds", "0"], r"--rounds: expected a positive integer"),
    (["--seeds", "0,0"], r"--seeds: expected distinct"),
    (["--seeds", "a"], r"--seeds: expected comma-separated integers"),
    (["--methods", "Nope"], r"unknown method"),
    (["--workers", "0"], r"--workers"),
    (["--threads", "-2"], r"--threads"),
])
def test_bad_values(capsys, tmp_path, argv, pattern):
    _refused(argv, capsys, tmp_path, pattern)


def test_out_folder_is_never_overwritten_silently(capsys, tmp_path):
    out = tmp_path / "previous-run"
    out.mkdir()
    (out / "personalize_domain.csv").write_text("a 50-minute run\n")
    _refused(["--out", str(out)], capsys, tmp_path, r"already holds files.*--overwrite")
    cfg = parse_args(["--out", str(out), "--overwrite", "--cache", str(tmp_path / "c")])
    assert cfg.out == str(out)
    assert (out / "personalize_domain.csv").read_text() == "a 50-minute run\n"  # parsing wrote nothing


def test_default_out_is_a_new_folder_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = parse_args(["--cache", str(tmp_path / "c")])
    Path(a.out).mkdir(parents=True)
    b = parse_args(["--cache", str(tmp_path / "c")])
    assert a.out != b.out and Path(a.out).parent == Path(b.out).parent == Path("results")


def test_good_defaults():
    cfg = parse_args(["--out", "/nonexistent/fresh"])
    assert cfg.seeds == (0, 1, 2, 3, 4) and cfg.threads == 1 and cfg.workers >= 1 and cfg.last_rounds == 3
    assert cfg.methods == ("Local", "Local-FT", "SingleSet-VPT", "FedAvg", "FedVPT", "Clustered-FedVPT", "pFedPG",
                           "FedPerfix", "VanillaAttention")
    assert cfg.data.evaluate == "test"
    # accuracies measured in rounds 3, 6, 9 (every third) and 10-12 (the last three, which the table reads)
    assert [r + 1 for r in range(12) if cfg.measured(r)] == [3, 6, 9, 10, 11, 12]
    every = parse_args(["--eval-every", "1", "--out", "/nonexistent/fresh"])
    assert all(every.measured(r) for r in range(12))
    assert parse_args(["--smoke", "--out", "/nonexistent/fresh"]).seeds == (0, 1)
    q = parse_args(["--quick", "--out", "/nonexistent/fresh"])
    assert q.seeds == (0, 1, 2) and q.budget.rounds == 4 and "Local-FT" not in q.methods
    assert len(parse_args(["--methods", "all", "--out", "/nonexistent/fresh"]).methods) == 13
    pilot = parse_args(["--pilot", "--out", "/nonexistent/fresh"])
    assert pilot.seeds == (100, 101) and pilot.data.evaluate == "val" and pilot.probe_convergence
    assert pilot.methods == ("Local", "Local-FT", "SingleSet-VPT", "FedVPT", "Clustered-FedVPT")
    assert not cfg.rebuild_backbone and parse_args(["--pretrain", "--out", "/nonexistent/fresh"]).rebuild_backbone
    # the oracle needs families: dropped from the default set under --split dirichlet
    assert "Clustered-FedVPT" not in parse_args(["--split", "dirichlet", "--out", "/nonexistent/fresh"]).methods


def test_help_is_clean():
    text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "personalize.py"), "--help"],
                          capture_output=True, text=True, timeout=120).stdout
    assert "None" not in text and "default: [" not in text
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
