"""The benchmarks' shared base model (minlora.bench.llama): its shape, its options, its build."""
from __future__ import annotations

import argparse

import pytest
import torch

from minlora.bench.llama import SHAPES, LlamaShape, add_shape_arguments, shape_from_args
from minlora.cli import main


def _parse(*argv: str, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser, **kw)
    return parser.parse_args(list(argv))


def test_options_left_out_keep_the_start_shape():
    start = SHAPES["llama3-8b"]
    assert shape_from_args(_parse(), start) == start
    got = shape_from_args(_parse("--hidden", "512", "--vocab", "100"), start)
    assert (got.hidden, got.vocab, got.layers, got.heads, got.kv_heads) == (512, 100, 32, 32, 8)


def test_heads_alone_sets_kv_heads_only_where_the_start_does_not_divide_them():
    start = LlamaShape(hidden=256, intermediate=64, layers=1, heads=16, kv_heads=8, vocab=50)
    assert shape_from_args(_parse("--heads", "32"), start).kv_heads == 8  # 32 % 8 == 0: kept (GQA)
    assert shape_from_args(_parse("--heads", "4"), start).kv_heads == 4  # 4 % 8 != 0: as many as heads
    assert shape_from_args(_parse("--heads", "4", "--kv-heads", "2"), start).kv_heads == 2


def test_a_renamed_layers_option():
    args = _parse("--model-layers", "3", layers_option="--model-layers")
    assert shape_from_args(args, SHAPES["tiny"]).layers == 3


@pytest.mark.parametrize("argv, named", [
    (("--hidden", "100", "--heads", "8"), "hidden (100) must be a multiple of heads (8)"),
    (("--heads", "8", "--kv-heads", "3"), "heads (8) must be a multiple of kv_heads (3)"),
])
def test_options_that_make_no_llama_are_refused_naming_them(argv, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        shape_from_args(_parse(*argv), SHAPES["small"])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_a_shape_field_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        LlamaShape(hidden=64, intermediate=96, layers=bad, heads=4, kv_heads=2, vocab=100)


def test_build_makes_that_llama_seeded():
    shape = LlamaShape(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64)
    a = shape.build(max_positions=16, seed=3)
    b = shape.build(max_positions=16, seed=3)
    c = shape.config(max_positions=16)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == (32, 48, 2, 4, 2, 64)
    assert not a.training and a.config.max_position_embeddings == 16
    assert a.model.layers[1].self_attn.k_proj.weight.shape == (16, 32)  # 2 KV heads of 8
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "Llama hidden 32, intermediate 48, 2 layers, 4 heads (2 KV), vocab 64" == shape.describe()


def test_the_cli_refuses_a_bad_shape_in_one_line(capsys):
    code = main(["bench", "model", "--preset", "tiny", "--hidden", "100", "--heads", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "hidden (100) must be a multiple of heads (8)" in err and "Traceback" not in err
