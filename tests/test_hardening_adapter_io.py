"""Issue 11 (adapter files) and 14.5: load_adapter refuses every tampered, corrupt or mismatched file with a ValueError
naming the file, and leaves the model bit-for-bit unchanged; save_adapter replaces the pair of files atomically,
durably, with the permissions of a normal write, and leaves no temporary files behind."""

from __future__ import annotations

import json
import os
import struct

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fedpeft.adapter_io as io
from fedpeft import VPT, LowRankPrompt, ParallelPrefix, load_adapter, save_adapter
from fedpeft.adapter_io import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=3, **kwargs)


def _randomized(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:  # bit for bit: the same bytes, NaN payloads included
        assert now[k].dtype == state[k].dtype and torch.equal(now[k].view(torch.uint8), state[k].view(torch.uint8)), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _read(folder):
    with safe_open(str(folder / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        return json.loads(f.metadata()["fedpeft_config"]), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(folder, *, tensors=None, config=None, meta=None):
    """Tamper with a saved adapter: other tensors and/or header config (the JSON copy is removed)."""
    old_config, old_tensors = _read(folder)
    tensors = old_tensors if tensors is None else tensors
    meta = json.dumps(old_config if config is None else config) if meta is None else meta
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME), metadata={"fedpeft_config": meta})
    (folder / ADAPTER_CONFIG_NAME).unlink(missing_ok=True)


@pytest.fixture
def saved(tmp_path):
    """A saved VPT adapter and a fresh model of the same configuration to load it into."""
    save_adapter(_randomized(VPT(_vit(), num_prompts=2)), tmp_path)
    return tmp_path, VPT(_vit(), num_prompts=2)


# ---- tensors: NaN/Inf, impossible dtypes, overflow, tampered keys and shapes ----------------------------------------


def _with(tensors, key, value):
    return {**tensors, key: value}


TENSOR_CASES = {
    "nan": (lambda t: _with(t, "prompts", torch.full_like(t["prompts"], float("nan"))), r"'prompts'.*non-finite"),
    "inf": (lambda t: _with(t, "prompts", torch.full_like(t["prompts"], float("inf"))), r"'prompts'.*non-finite"),
    "bool": (lambda t: _with(t, "prompts", torch.ones_like(t["prompts"], dtype=torch.bool)), r"'prompts'.*torch.bool"),
    "int": (lambda t: _with(t, "model.head.bias", torch.ones(3, dtype=torch.int64)), r"'model.head.bias'.*int64"),
    "complex": (lambda t: _with(t, "prompts", t["prompts"].to(torch.complex64)), r"'prompts'.*complex64"),
    "float64 overflow": (lambda t: _with(t, "prompts", torch.full(t["prompts"].shape, 1e300, dtype=torch.float64)),
                         r"'prompts' overflows torch.float32"),
    "shape": (lambda t: _with(t, "prompts", torch.zeros(1, 3, 64)), r"shape mismatch for 'prompts'"),
    "missing key": (lambda t: {k: v for k, v in t.items() if k != "model.head.bias"}, r"missing \['model.head.bias'\]"),
    "extra key": (lambda t: _with(t, "model.blocks.0.attn.qkv.weight", torch.zeros(192, 64)), "unexpected"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_tensors_are_refused_naming_file_and_key(saved, case):
    folder, model = saved
    tamper, match = TENSOR_CASES[case]
    _rewrite(folder, tensors=tamper(_read(folder)[1]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        load_adapter(model, folder)
    assert str(folder / ADAPTER_WEIGHTS_NAME) in str(info.value)
    _assert_unchanged(model, snap)


def test_float32_values_that_overflow_a_float16_model_are_refused(tmp_path):
    save_adapter(_randomized(VPT(_vit(), num_prompts=2)), tmp_path)
    _, tensors = _read(tmp_path)
    _rewrite(tmp_path, tensors=_with(tensors, "prompts", torch.full_like(tensors["prompts"], 1e5)))
    model = VPT(_vit().half(), num_prompts=2)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"'prompts' overflows torch.float16"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


# ---- config: not an object, format version, hyper-parameters --------------------------------------------------------


@pytest.mark.parametrize(
    "meta, match",
    [("[1, 2]", "must be a JSON object, got list"), ('"VPT"', "must be a JSON object, got str"),
     ("{not json", "not valid JSON")],
)
def test_config_that_is_not_a_json_object(saved, meta, match):
    folder, model = saved
    _rewrite(folder, meta=meta)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, folder)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_unknown_format_version(saved, version):
    folder, model = saved
    config, _ = _read(folder)
    config["format"] = version
    if version is None:
        del config["format"]
    _rewrite(folder, config=config)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown adapter format version .* reads format 1"):
        load_adapter(model, folder)
    _assert_unchanged(model, snap)


def _pp(scale=1.5, init="fedperfix", bottleneck=4):
    return ParallelPrefix(_vit(), bottleneck=bottleneck, scale=scale, init=init)


def _lowrank(rank, deep=False, **vit_kwargs):
    vit = _vit(**vit_kwargs)
    depth = len(vit.blocks) if deep else 1
    return VPT(vit, num_prompts=2, deep=deep,
               prompts=LowRankPrompt(num_prompts=2, embed_dim=vit.embed_dim, rank=rank, depth=depth))


HYPER_CASES = {  # saved model, model to load into, every mismatch the message must list
    "scale": (lambda: _pp(scale=3.0), lambda: _pp(scale=1.5), ["scale: file 3.0, model 1.5"]),
    "init": (lambda: _pp(init="zero"), lambda: _pp(), ["init: file 'zero', model 'fedperfix'"]),
    "bottleneck": (lambda: _pp(bottleneck=4), lambda: _pp(bottleneck=8), ["bottleneck: file 4, model 8"]),
    "num_prompts": (lambda: VPT(_vit(), num_prompts=2), lambda: VPT(_vit(), num_prompts=3),
                    ["num_prompts: file 2, model 3"]),
    "deep": (lambda: VPT(_vit(), num_prompts=2, deep=True), lambda: VPT(_vit(), num_prompts=2),
             ["deep: file True, model False"]),
    # a shallow VPT's prompts and head have the same shapes on a deeper ViT: only the config can tell
    "depth": (lambda: VPT(_vit(), num_prompts=2), lambda: VPT(_vit(depth=3), num_prompts=2),
              ["depth: file 6, model 3"]),
    "embed_dim": (lambda: VPT(_vit(), num_prompts=2), lambda: VPT(_vit(embed_dim=32, num_heads=2), num_prompts=2),
                  ["embed_dim: file 64, model 32"]),
    "rank": (lambda: _lowrank(1), lambda: _lowrank(2), ["prompt_module.rank: file 1, model 2"]),
    "several": (lambda: _pp(scale=3.0, init="zero"), lambda: _pp(), ["init: file 'zero', model 'fedperfix'",
                                                                      "scale: file 3.0, model 1.5"]),
}


@pytest.mark.parametrize("case", sorted(HYPER_CASES))
def test_every_hyper_parameter_mismatch_is_listed(tmp_path, case):
    make_saved, make_target, expected = HYPER_CASES[case]
    src = _randomized(make_saved())
    save_adapter(src, tmp_path)
    del src  # releases its ViT (one wrapper per ViT)
    model = make_target()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="other hyper-parameters") as info:
        load_adapter(model, tmp_path)
    listed = str(info.value).split("other hyper-parameters than the model has: ")[1].split("; ")
    assert listed == expected
    _assert_unchanged(model, snap)


def test_scale_mismatch_used_to_load_and_change_the_logits(tmp_path):
    """The issue's example: a scale=3.0 adapter in a scale=1.5 model would compute other logits."""
    src = _randomized(_pp(scale=3.0))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        want = src.eval()(x)
    save_adapter(src, tmp_path)
    same = _pp(scale=3.0)
    load_adapter(same, tmp_path)
    with torch.no_grad():
        assert torch.equal(same.eval()(x), want)  # the matching model reproduces the logits exactly
    with pytest.raises(ValueError, match=r"scale: file 3\.0, model 1\.5"):
        load_adapter(_pp(scale=1.5), tmp_path)


def test_dropout_is_a_training_setting_and_may_differ(tmp_path):
    save_adapter(_randomized(VPT(_vit(), num_prompts=2, dropout=0.1)), tmp_path)
    load_adapter(VPT(_vit(), num_prompts=2), tmp_path)


def test_json_copy_must_agree_with_the_header(saved):
    folder, model = saved
    copy = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    copy["wrappers"][0]["num_prompts"] = 7
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(copy))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG_NAME} does not match the config stored in"):
        load_adapter(model, folder)
    _assert_unchanged(model, snap)
    (folder / ADAPTER_CONFIG_NAME).unlink()  # the weights file alone is enough
    load_adapter(model, folder)


# ---- corrupt files ----------------------------------------------------------------------------------------------


def _corrupt(kind, good: bytes) -> bytes:
    return {
        "truncated": good[: len(good) - 7],
        "zero bytes": b"",
        "absurd header length": struct.pack("<Q", 2**62) + good[8:],
        "garbage header": struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 32,
        "text file": b"these are not the tensors you are looking for\n",
    }[kind]


@pytest.mark.parametrize("kind", ["truncated", "zero bytes", "absurd header length", "garbage header", "text file",
                                  "symlink to text"])
def test_corrupt_files_raise_value_error_naming_the_file(saved, kind):
    folder, model = saved
    weights = folder / ADAPTER_WEIGHTS_NAME
    good = weights.read_bytes()
    if kind == "symlink to text":
        other = folder / "notes.txt"
        other.write_text("hello")
        weights.unlink()
        weights.symlink_to(other)
    else:
        weights.write_bytes(_corrupt(kind, good))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        load_adapter(model, folder)
    assert str(weights) in str(info.value)
    _assert_unchanged(model, snap)


# ---- paths (issue 14.5) ----------------------------------------------------------------------------------------


def test_the_weights_file_path_is_accepted_as_well_as_the_folder(tmp_path):
    src = _randomized(VPT(_vit(), num_prompts=2))
    save_adapter(src, tmp_path / "a" / ADAPTER_WEIGHTS_NAME)  # saving to the file path uses its folder
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME])
    dst = VPT(_vit(), num_prompts=2)
    load_adapter(dst, tmp_path / "a" / ADAPTER_WEIGHTS_NAME)
    assert torch.equal(dst.prompts, src.prompts)
    (tmp_path / "a" / "other.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        load_adapter(dst, tmp_path / "a" / "other.bin")


# ---- saving: permissions, fsync, atomic pair, leftovers ---------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_of_a_normal_write(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_adapter(VPT(_vit(), num_prompts=2), tmp_path)
    finally:
        os.umask(old)
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_data_is_fsynced_before_each_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    save_adapter(VPT(_vit(), num_prompts=2), tmp_path)
    renamed = [path for op, path in events if op == "replace"]
    assert len(renamed) == 2
    for tmp in renamed:  # each temporary file was fsync'ed before it was renamed, and the folder after
        i = events.index(("replace", tmp))
        assert ("fsync", tmp) in events[:i]
        assert ("fsync", str(tmp_path)) in events[i + 1:]


@pytest.mark.parametrize("crash_at", ["unlink old json", "rename weights", "rename json", "write json"])
def test_a_crash_at_any_step_never_leaves_new_weights_beside_an_old_config(tmp_path, monkeypatch, crash_at):
    old, new = _randomized(VPT(_vit(), num_prompts=2)), VPT(_vit(), num_prompts=2, train_head=False)
    save_adapter(old, tmp_path)
    real_replace, real_unlink, real_write_temp = os.replace, type(tmp_path).unlink, io._atomic.write_temp
    calls = {"replace": 0}

    class Crash(BaseException):
        pass

    def replace(a, b):
        calls["replace"] += 1
        if (crash_at, calls["replace"]) in {("rename weights", 1), ("rename json", 2)}:
            raise Crash
        real_replace(a, b)

    def unlink(self, missing_ok=False):
        if crash_at == "unlink old json" and self.name == ADAPTER_CONFIG_NAME:
            raise Crash
        real_unlink(self, missing_ok=missing_ok)

    def write_temp(final, write):
        if crash_at == "write json" and final.name == ADAPTER_CONFIG_NAME:
            raise Crash
        return real_write_temp(final, write)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(type(tmp_path), "unlink", unlink)
    monkeypatch.setattr(io._atomic, "write_temp", write_temp)
    with pytest.raises(Crash):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    header, tensors = _read(tmp_path)
    if (tmp_path / ADAPTER_CONFIG_NAME).exists():  # whatever JSON is there describes the weights beside it
        assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text()) == header
    is_new = header["wrappers"][0]["train_head"] is False
    assert set(tensors) == ({"prompts"} if is_new else {"prompts", "model.head.weight", "model.head.bias"})
    assert is_new == (crash_at == "rename json")  # only the last step's failure leaves the new weights
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # cleaned up on the way out


def test_leftovers_of_a_killed_save_are_removed_by_the_next_one(tmp_path):
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        (tmp_path / f".{name}.0123456789abcdef.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("the user's own file stays")
    save_adapter(VPT(_vit(), num_prompts=2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME,
                                                                  "notes.txt"])


# ---- issue 19.6: the header's parameter shapes, files of a newer fedpeft -------------------------------------------


def _set(key, value):
    """A config tamperer: ``config[key] = value`` (``...`` deletes the key; a dotted key reaches into a sub-dict)."""

    def tamper(config):
        *path, last = key.split(".")
        for part in path:
            config = config[part]
        if value is ...:
            del config[last]
        else:
            config[last] = value

    return tamper


def _both(*tamperers):
    return lambda config: [t(config) for t in tamperers]


HEADER_CASES = {  # tampered header config → what the refusal must say
    # the header said [999, 999] for the prompts and the file still loaded
    "shape": (_set("parameters.prompts", [999, 999]),
              r"shapes in the header .*'prompts': file \[999, 999\], model \[1, 2, 64\]"),
    "no parameters": (_set("parameters", ...), "shapes in the header"),
    "parameters a list": (_set("parameters", [1, 2, 64]), r"'parameters' must be a JSON object"),
    "a key missing": (_set("parameters", {"prompts": [1, 2, 64]}), r"'model.head.bias': file missing, model \[3\]"),
    "newer, format 2": (_both(_set("fedpeft_version", "99.0.0"), _set("format", 2)),
                        r"format version 2 \(written by fedpeft 99.0.0\).*reads format 1"),
    "format 3": (_both(_set("fedpeft_version", "0.2.0"), _set("format", 3)),
                 r"format version 3 \(written by fedpeft 0.2.0\).*reads format 1"),
    "no version": (_set("fedpeft_version", ...), "'fedpeft_version' must be a version string, got None"),
    "int version": (_set("fedpeft_version", 2), "'fedpeft_version' must be a version string, got 2"),
    "list version": (_set("fedpeft_version", ["0.2.0"]), "'fedpeft_version' must be a version string"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_shapes_and_versions_are_checked(saved, case):
    folder, model = saved
    tamper, match = HEADER_CASES[case]
    config, _ = _read(folder)
    tamper(config)
    _rewrite(folder, config=config)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, folder)
    _assert_unchanged(model, snap)


def test_a_newer_fedpeft_s_file_loads_when_its_format_is_known(saved):
    folder, model = saved
    config, tensors = _read(folder)
    config["fedpeft_version"] = "99.0.0"
    _rewrite(folder, config=config)
    load_adapter(model, folder)
    state = dict(model.named_parameters())
    for key, value in tensors.items():  # oracle: the tensors as written in the file
        assert torch.equal(state[key].detach(), value), key
