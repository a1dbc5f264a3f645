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


# ---------------------------------------------------------------- damaged native files


def _blob(tensors: dict, config: str = '{"r":2}', scales: str = '{"m":0.5}', **meta: str) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "minlora-adapter-v1", "config": config, "scales": scales, **meta})


def _damaged_files() -> dict[str, bytes]:
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    good = serialize(Adapter({"m": LoraWeights(a, b, 0.5)}, {"r": 2}))
    from safetensors.torch import save

    cases = {f"truncated to {n} bytes": good[:n] for n in (0, 5, 8, 40, len(good) // 2, len(good) - 1)}
    header_len = int.from_bytes(good[:8], "little")
    cases.update({
        "header length past the end": (10**12).to_bytes(8, "little") + good[8:],
        "header not JSON": good[:8] + b"#" * header_len + good[8 + header_len:],
        "header not an object": (2).to_bytes(8, "little") + b"[]",
        "header not UTF-8": (2).to_bytes(8, "little") + b"\xff\xfe",
        "metadata not strings": _raw_header({"__metadata__": {"format": 1}}),
        "no metadata": save({"m.lora_A": a, "m.lora_B": b}),
        "no config": save({"m.lora_A": a, "m.lora_B": b}, metadata={"format": "minlora-adapter-v1", "scales": "{}"}),
        "no scales": save({"m.lora_A": a, "m.lora_B": b}, metadata={"format": "minlora-adapter-v1", "config": "{}"}),
        "config not JSON": _blob({"m.lora_A": a, "m.lora_B": b}, config="{oops"),
        "config not an object": _blob({"m.lora_A": a, "m.lora_B": b}, config="[1]"),
        "config nested absurdly": _blob({"m.lora_A": a, "m.lora_B": b}, config="[" * 100_000 + "]" * 100_000),
        "scales not an object": _blob({"m.lora_A": a, "m.lora_B": b}, scales="[0.5]"),
        "scale not a number": _blob({"m.lora_A": a, "m.lora_B": b}, scales='{"m":"abc"}'),
        "scale NaN": _blob({"m.lora_A": a, "m.lora_B": b}, scales='{"m":NaN}'),
        "scale Infinity": _blob({"m.lora_A": a, "m.lora_B": b}, scales='{"m":Infinity}'),
        "zero modules": _blob({}, scales="{}"),
        "A and B dtypes differ": _blob({"m.lora_A": a, "m.lora_B": b.half()}),
        "integer factors": _blob({"m.lora_A": a.to(torch.int32), "m.lora_B": b.to(torch.int32)}),
        "1-D factor": _blob({"m.lora_A": a.flatten(), "m.lora_B": b}),
        "ranks differ": _blob({"m.lora_A": a, "m.lora_B": torch.randn(3, 5)}),
        "missing B": _blob({"m.lora_A": a}),
        "extra tensor": _blob({"m.lora_A": a, "m.lora_B": b, "stray": a.clone()}),
    })
    return cases


def _raw_header(header: dict) -> bytes:
    import json

    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("what", sorted(_damaged_files()))
def test_damaged_native_file_is_a_value_error(tmp_path, what):
    """Truncated or malformed files, zero modules, non-finite scales, A/B dtypes that differ:
    ValueError (never SafetensorError / KeyError / AttributeError / a JSON error), naming the file
    when read from one."""
    data = _damaged_files()[what]
    with pytest.raises(ValueError) as info:
        deserialize(data)
    assert type(info.value) is ValueError, (what, type(info.value))
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    for read in (load_adapter_file, load_adapter):
        with pytest.raises(ValueError, match="damaged.safetensors.*not a minlora adapter file") as info:
            read(path)
        assert type(info.value) is ValueError, what


def test_cli_commit_of_a_truncated_file_is_one_clear_line(tmp_path, capsys):
    from minlora.cli import main

    save_adapter_file(_adapter(5), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 3])
    code = main(["adapters", "--root", str(tmp_path / "reg"), "commit", "a", str(tmp_path / "cut.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "cut.safetensors" in err and "not a minlora adapter file" in err and "Traceback" not in err
