"""Checkpoint loading: round trips through both layouts (sharded and not) and clear errors for
bad checkpoints (each names the tensor, file or config field)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_kernels import GptOss, GptOssConfig
from gptoss_kernels.loader import CheckpointError

from . import checkpoints as ck

CFG = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=96, hidden_size=64,
           intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])


@pytest.fixture(scope="module")
def model():
    return GptOss.from_config(GptOssConfig(**CFG), seed=1)


@pytest.fixture(scope="module")
def ref_logits(model):
    return model(IDS)


@pytest.fixture(scope="module")
def orig_dir(model, tmp_path_factory):
    return ck.save_model_original(model, tmp_path_factory.mktemp("orig") / "original")


@pytest.fixture
def bad(orig_dir, tmp_path):
    """A fresh copy of the original-layout checkpoint to break."""
    d = tmp_path / "bad"
    shutil.copytree(orig_dir, d)
    return d


def _load(path):
    return GptOss.from_pretrained(path, progress=False)


def test_round_trip_original(orig_dir, ref_logits, model):
    m = _load(orig_dir)
    assert torch.equal(m(IDS), ref_logits)
    assert m.weights_bytes() == model.weights_bytes()


def test_round_trip_hf_sharded(model, ref_logits, tmp_path):
    d = ck.save_model_hf_mxfp4(model, tmp_path / "hf", shards=3)
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) == 3
    assert torch.equal(_load(d)(IDS), ref_logits)


def test_repo_root_with_original_subfolder(orig_dir, ref_logits):
    assert torch.equal(_load(os.path.dirname(orig_dir))(IDS), ref_logits)


def test_glob_of_shards_without_index(model, ref_logits, tmp_path):
    d = tmp_path / "o"
    ck.save_model_original(model, d)
    t = load_file(d / "model.safetensors")
    names = sorted(t)
    os.remove(d / "model.safetensors")
    save_file({n: t[n] for n in names[::2]}, d / "a.safetensors")
    save_file({n: t[n] for n in names[1::2]}, d / "b.safetensors")
    assert torch.equal(_load(d)(IDS), ref_logits)


def _rewrite(d, fn):
    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors")


def _edit_config(d, **kw):
    c = json.loads((d / "config.json").read_text())
    c.update(kw)
    (d / "config.json").write_text(json.dumps(c))


def test_missing_tensor(bad):
    _rewrite(bad, lambda t: t.pop("block.1.attn.sinks"))
    with pytest.raises(CheckpointError, match=r"missing.*block\.1\.attn\.sinks"):
        _load(bad)


def test_extra_tensor(bad):
    _rewrite(bad, lambda t: t.__setitem__("block.0.attn.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*block\.0\.attn\.extra"):
        _load(bad)


def test_wrong_shape(bad):
    _rewrite(bad, lambda t: t.__setitem__("block.1.mlp.gate.weight", torch.zeros(4, 32, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"block\.1\.mlp\.gate\.weight has shape \(4, 32\), expected \(4, 64\)"):
        _load(bad)


def test_wrong_dtype(bad):
    def f(t):
        t["block.0.mlp.mlp1_weight.scales"] = t["block.0.mlp.mlp1_weight.scales"].to(torch.int32)
    _rewrite(bad, f)
    with pytest.raises(CheckpointError, match=r"block\.0\.mlp\.mlp1_weight\.scales has dtype I32, expected U8"):
        _load(bad)
    _rewrite(bad, lambda t: t.__setitem__("block.0.mlp.mlp1_weight.scales",
                                          torch.full((4, 64, 2), 120, dtype=torch.uint8)))
    _rewrite(bad, lambda t: t.__setitem__("norm.scale", torch.ones(64, dtype=torch.int64)))
    with pytest.raises(CheckpointError, match=r"norm\.scale has dtype I64"):
        _load(bad)


def test_config_contradicts_tensors(bad):
    _edit_config(bad, num_experts=8)
    with pytest.raises(CheckpointError, match=r"block\.0\.mlp\.gate\.weight has shape \(4, 64\), expected \(8, 64\).*num_experts"):
        _load(bad)
    _edit_config(bad, num_experts=4, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing.*num_hidden_layers=3.*block\.2\."):
        _load(bad)


def test_truncated_file(bad):
    f = bad / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        _load(bad)
    with open(f, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(CheckpointError, match="truncated"):
        _load(bad)


def test_unknown_layout(bad, tmp_path):
    (bad / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        _load(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        _load(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nowhere")


def test_missing_config_field(bad):
    c = json.loads((bad / "config.json").read_text())
    del c["head_dim"]
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="head_dim"):
        _load(bad)


def test_unsupported_quantization_and_rope(model, tmp_path):
    d = ck.save_model_hf_mxfp4(model, tmp_path / "hf")
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"]["quant_method"] = "fp8"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="quant_method"):
        _load(d)
    c["quantization_config"]["quant_method"] = "mxfp4"
    c["rope_scaling"]["truncate"] = True
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="truncate"):
        _load(d)


def test_index_names_missing_shard(model, tmp_path):
    d = ck.save_model_hf_mxfp4(model, tmp_path / "hf", shards=2)
    os.remove(d / "model-00001-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=r"shard model-00001-of-00001\.safetensors.*does not exist"):
        _load(d)


def test_a_file_given_as_checkpoint(orig_dir):
    with pytest.raises(CheckpointError, match=r"config.json' is a file: give the folder that holds config.json"):
        _load(os.path.join(orig_dir, "config.json"))
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(os.path.join(orig_dir, "nowhere"))
