"""minlora.formats: the one validation of an adapter, minlora's own file, load_adapter's dispatch
and the atomic writer every format uses."""
from __future__ import annotations

import os

import pytest
import torch

from minlora.formats import (
    Adapter,
    LoraWeights,
    check_adapter,
    content_hash,
    deserialize,
    load_adapter,
    load_adapter_file,
    save_adapter_file,
    save_peft,
    serialize,
    write_atomic,
)


def _adapter(seed: int = 0, dtype: torch.dtype = torch.float32) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {
        "layers.0.q_proj": LoraWeights(torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 0.5),
        "layers.1.q_proj": LoraWeights(torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g), 2.0),
    }
    for w in mods.values():
        w.a, w.b = w.a.to(dtype), w.b.to(dtype)
    return Adapter(mods, {"r": 2, "lora_alpha": 1.0})


def _same(x: Adapter, y: Adapter) -> None:
    assert sorted(x.modules) == sorted(y.modules)
    for name, w in x.modules.items():
        assert torch.equal(y.modules[name].a, w.a) and torch.equal(y.modules[name].b, w.b)
        assert y.modules[name].scale == w.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_round_trip_and_hash(tmp_path, dtype):
    x = _adapter(1, dtype)
    _same(x, deserialize(serialize(x)))
    save_adapter_file(x, tmp_path / "x.safetensors")
    _same(x, load_adapter_file(tmp_path / "x.safetensors"))
    assert content_hash(load_adapter_file(tmp_path / "x.safetensors")) == content_hash(x)
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temporary file left behind


def test_load_adapter_dispatches_on_file_or_directory(tmp_path):
    x = _adapter(2)
    save_adapter_file(x, tmp_path / "native.safetensors")
    save_peft(x, tmp_path / "peft-dir")
    _same(x, load_adapter(tmp_path / "native.safetensors"))
    y = load_adapter(str(tmp_path / "peft-dir"))
    assert sorted(y.modules) == sorted(x.modules)
    for name, w in x.modules.items():
        assert torch.equal(y.modules[name].a, w.a) and y.modules[name].scale == pytest.approx(w.scale)
    with pytest.raises(FileNotFoundError, match="no adapter file or PEFT adapter directory"):
        load_adapter(tmp_path / "nothing")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="not a PEFT directory"):
        load_adapter(tmp_path / "junk.bin")


def test_check_adapter_is_the_one_validation():
    good = _adapter(3)
    check_adapter(good)
    with pytest.raises(TypeError, match="minlora.formats.Adapter"):
        check_adapter({"m": good.modules["layers.0.q_proj"]})
    with pytest.raises(ValueError, match="at least one module"):
        check_adapter(Adapter({}))
    with pytest.raises(TypeError, match="LoraWeights"):
        check_adapter(Adapter({"m": (torch.ones(1, 2), torch.ones(2, 1))}))
    with pytest.raises(ValueError, match="non-empty strings"):
        check_adapter(Adapter({"": LoraWeights(torch.ones(1, 2), torch.ones(2, 1), 1.0)}))
    with pytest.raises(TypeError, match="floating point"):
        check_adapter(Adapter({"m": LoraWeights(torch.ones(1, 2, dtype=torch.int32), torch.ones(2, 1), 1.0)}))
    with pytest.raises(ValueError, match="torch.float16"):
        check_adapter(Adapter({"m": LoraWeights(torch.ones(1, 2), torch.ones(2, 1, dtype=torch.float16), 1.0)}))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            check_adapter(Adapter({"m": LoraWeights(torch.ones(1, 2), torch.ones(2, 1), bad)}))
    for bad in ("abc", True, None):
        with pytest.raises(TypeError, match="real number"):
            check_adapter(Adapter({"m": LoraWeights(torch.ones(1, 2), torch.ones(2, 1), bad)}))
    w = LoraWeights(torch.ones(2, 4), torch.ones(3, 2), 1.0)
    w.b = torch.ones(3, 5)  # fields are mutable: the check does not trust __post_init__
    with pytest.raises(ValueError, match="expected a"):
        check_adapter(Adapter({"m": w}))


def test_write_atomic_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    write_atomic(target, b"old contents")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new contents that never land")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_registry_export_writes_through_the_atomic_writer(tmp_path, monkeypatch, capsys):
    """`minlora adapters export --format minlora` over an existing file: when the write fails
    part-way, the old file is still whole (a plain open/write would have truncated it)."""
    from minlora.cli import main

    root = str(tmp_path / "reg")
    save_adapter_file(_adapter(4), tmp_path / "in.safetensors")
    assert main(["adapters", "--root", root, "commit", "a", str(tmp_path / "in.safetensors")]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.safetensors").write_bytes(b"the previous export")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    try:
        code = main(["adapters", "--root", root, "export", "a", str(out / "a.safetensors"), "--format", "minlora"])
    except OSError:
        code = None
    monkeypatch.undo()
    capsys.readouterr()
    assert code != 0
    assert (out / "a.safetensors").read_bytes() == b"the previous export"
    assert os.listdir(out) == ["a.safetensors"]
    assert main(["adapters", "--root", root, "export", "a", str(out / "a.safetensors"), "--format", "minlora"]) == 0
    _same(_adapter(4), load_adapter_file(out / "a.safetensors"))
