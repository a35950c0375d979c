"""Checkpoint loading for GptOss (spec §2): detect the layout, check every tensor's name, shape and
dtype from the safetensors headers *before* reading any data, then stream the tensors file by file
(``safetensors.safe_open``; host memory stays near one tensor) onto the device.

Layouts (detected from ``config.json``):
  * ``hf-mxfp4``: Hugging Face, ``quantization_config.quant_method == "mxfp4"``; experts as
    ``*_blocks``/``*_scales`` (byte-identical to the original); q/k/v split (fused here).
  * ``hf-bf16``: Hugging Face without quantization (as ``save_pretrained`` writes a dense model):
    experts ``gate_up_proj`` [E, H, 2I] / ``down_proj`` [E, I, H] (input-major). They are
    transposed to [E, out, in] and **quantized to MXFP4 at load** (``mxfp4_quantize``, OCP
    rounding, one expert at a time), because the model's MoE path is MXFP4 only. Values already on
    the MXFP4 grid (a dequantized MXFP4 checkpoint) round-trip exactly; others are rounded.
  * ``original``: ``config.json`` with ``num_experts``; tensors ``block.N.*`` with fused qkv.
    A folder without config.json but with ``original/config.json`` loads from ``original/``.

Files: ``model.safetensors.index.json`` (weight_map) if present, else ``model.safetensors``, else
every ``*.safetensors`` in the folder. Errors (``CheckpointError``, a ValueError) name the tensor,
file or config field; nothing is returned until every tensor is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from .config import GptOssConfig
from .weights import UINT8, weight_shapes

__all__ = ["CheckpointError", "detect_layout", "load_checkpoint", "hf_names", "original_names"]

_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

# Config fields that set each weight's shape (for error messages).
_FIELDS = {
    "embedding": "vocab_size, hidden_size", "unembedding": "vocab_size, hidden_size", "norm": "hidden_size",
    "attn_norm": "hidden_size", "mlp_norm": "hidden_size",
    "qkv_w": "num_attention_heads, num_key_value_heads, head_dim, hidden_size",
    "qkv_b": "num_attention_heads, num_key_value_heads, head_dim", "sinks": "num_attention_heads",
    "out_w": "hidden_size, num_attention_heads, head_dim", "out_b": "hidden_size",
    "gate_w": "num_experts, hidden_size", "gate_b": "num_experts",
    "w1_blocks": "num_experts, intermediate_size, hidden_size", "w1_scales": "num_experts, intermediate_size, hidden_size",
    "w1_bias": "num_experts, intermediate_size", "w2_blocks": "num_experts, hidden_size, intermediate_size",
    "w2_scales": "num_experts, hidden_size, intermediate_size", "w2_bias": "num_experts, hidden_size",
    "w1_dense": "num_experts, hidden_size, intermediate_size", "w2_dense": "num_experts, intermediate_size, hidden_size",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor, file or field."""


@dataclass(frozen=True)
class _Target:
    layer: int | None      # None: a global weight
    key: str               # our weight name (weights.py), or w1_dense / w2_dense
    part: str | None       # "q" / "k" / "v" for split projections
    shape: tuple
    kind: str              # "float" or "uint8"


# ----------------------------------------------------------------------------------------------
# names per layout
# ----------------------------------------------------------------------------------------------

_ORIG_LAYER = {"attn.norm.scale": "attn_norm", "attn.qkv.weight": "qkv_w", "attn.qkv.bias": "qkv_b",
               "attn.sinks": "sinks", "attn.out.weight": "out_w", "attn.out.bias": "out_b",
               "mlp.norm.scale": "mlp_norm", "mlp.gate.weight": "gate_w", "mlp.gate.bias": "gate_b",
               "mlp.mlp1_weight.blocks": "w1_blocks", "mlp.mlp1_weight.scales": "w1_scales", "mlp.mlp1_bias": "w1_bias",
               "mlp.mlp2_weight.blocks": "w2_blocks", "mlp.mlp2_weight.scales": "w2_scales", "mlp.mlp2_bias": "w2_bias"}
_ORIG_GLOBAL = {"embedding.weight": "embedding", "norm.scale": "norm", "unembedding.weight": "unembedding"}
_HF_GLOBAL = {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm", "lm_head.weight": "unembedding"}
_HF_LAYER = {"input_layernorm.weight": "attn_norm", "self_attn.o_proj.weight": "out_w", "self_attn.o_proj.bias": "out_b",
             "self_attn.sinks": "sinks", "post_attention_layernorm.weight": "mlp_norm",
             "mlp.router.weight": "gate_w", "mlp.router.bias": "gate_b",
             "mlp.experts.gate_up_proj_bias": "w1_bias", "mlp.experts.down_proj_bias": "w2_bias"}
_HF_MXFP4 = {"mlp.experts.gate_up_proj_blocks": "w1_blocks", "mlp.experts.gate_up_proj_scales": "w1_scales",
             "mlp.experts.down_proj_blocks": "w2_blocks", "mlp.experts.down_proj_scales": "w2_scales"}


def original_names(cfg: GptOssConfig) -> dict[str, _Target]:
    g, layers = weight_shapes(cfg)
    out = {n: _Target(None, k, None, *g[k]) for n, k in _ORIG_GLOBAL.items()}
    for i, spec in enumerate(layers):
        out.update({f"block.{i}.{n}": _Target(i, k, None, *spec[k]) for n, k in _ORIG_LAYER.items()})
    return out


def hf_names(cfg: GptOssConfig, *, mxfp4: bool = True) -> dict[str, _Target]:
    g, layers = weight_shapes(cfg)
    nq, nkv, d, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    E, I = cfg.num_experts, cfg.intermediate_size
    out = {n: _Target(None, k, None, *g[k]) for n, k in _HF_GLOBAL.items()}
    for i, spec in enumerate(layers):
        p = f"model.layers.{i}."
        out.update({p + n: _Target(i, k, None, *spec[k]) for n, k in _HF_LAYER.items()})
        for part, heads in (("q", nq), ("k", nkv), ("v", nkv)):
            out[p + f"self_attn.{part}_proj.weight"] = _Target(i, "qkv_w", part, (heads * d, H), "float")
            out[p + f"self_attn.{part}_proj.bias"] = _Target(i, "qkv_b", part, (heads * d,), "float")
        if mxfp4:
            out.update({p + n: _Target(i, k, None, *spec[k]) for n, k in _HF_MXFP4.items()})
        else:
            out[p + "mlp.experts.gate_up_proj"] = _Target(i, "w1_dense", None, (E, H, 2 * I), "float")
            out[p + "mlp.experts.down_proj"] = _Target(i, "w2_dense", None, (E, I, H), "float")
    return out


# ----------------------------------------------------------------------------------------------
# layout and files
# ----------------------------------------------------------------------------------------------

def detect_layout(path) -> tuple[str, str, GptOssConfig]:
    """-> (folder holding the tensors, layout name, config)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is a file: give the folder that holds config.json and the "
                              f"*.safetensors files ({os.path.dirname(os.path.abspath(path))!r}?)")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path!r} does not exist")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file) and os.path.exists(os.path.join(path, "original", "config.json")):
        path = os.path.join(path, "original")
        cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{path}: no config.json (nor original/config.json): unknown checkpoint layout")
    try:
        with open(cfg_file) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read it as JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    try:
        if "quantization_config" in d:
            method = (d["quantization_config"] or {}).get("quant_method")
            if method != "mxfp4":
                raise CheckpointError(f"{cfg_file}: quantization_config.quant_method is {method!r}; only 'mxfp4' "
                                      f"(or no quantization_config, a bf16 checkpoint) is supported")
            return path, "hf-mxfp4", GptOssConfig.from_hf_dict(d)
        if "num_local_experts" in d or d.get("model_type") == "gpt_oss":
            return path, "hf-bf16", GptOssConfig.from_hf_dict(d)
        if "num_experts" in d:
            return path, "original", GptOssConfig.from_original_dict(d)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e
    raise CheckpointError(f"{cfg_file}: unknown checkpoint layout: neither a Hugging Face gpt_oss config "
                          f"(model_type/num_local_experts) nor an original one (num_experts)")


def _read_header(file: str) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype string, shape) from a safetensors header; checks the file holds all the data."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{file}: truncated (header of {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from e
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = (info["dtype"], tuple(info["shape"]))
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return out


def _files(folder: str) -> dict[str, dict[str, tuple[str, tuple]]]:
    """file -> its header; checks the index (if any) agrees with the files."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read weight_map: {e}") from e
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.exists(os.path.join(folder, fn)):
                raise CheckpointError(f"{index}: shard {fn} (e.g. for {next(k for k, v in weight_map.items() if v == fn)}) "
                                      f"does not exist")
        headers = {fn: _read_header(os.path.join(folder, fn)) for fn in files}
        for name, fn in weight_map.items():
            if name not in headers[fn]:
                raise CheckpointError(f"{index}: tensor {name} is mapped to {fn}, which does not contain it")
        return {os.path.join(folder, fn): {k: v for k, v in h.items() if weight_map.get(k) == fn}
                for fn, h in headers.items()}
    single = os.path.join(folder, "model.safetensors")
    files = [single] if os.path.exists(single) else sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    return {f: _read_header(f) for f in files}


def _check(headers: dict, expected: dict[str, _Target], cfg_desc: str) -> None:
    seen: dict[str, str] = {}
    for file, h in headers.items():
        for name in h:
            if name in seen:
                raise CheckpointError(f"tensor {name} appears in both {seen[name]} and {file}")
            seen[name] = file
    missing = [n for n in expected if n not in seen]
    extra = [n for n in seen if n not in expected]
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint ({cfg_desc}): "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"{len(extra)} unexpected tensor(s) in the checkpoint ({cfg_desc}): "
                              f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    for name, tgt in expected.items():
        dt, shape = headers[seen[name]][name]
        if shape != tuple(tgt.shape):
            raise CheckpointError(f"tensor {name} has shape {shape}, expected {tuple(tgt.shape)} from config.json "
                                  f"({_FIELDS.get(tgt.key, '')}; {cfg_desc}) [{os.path.basename(seen[name])}]")
        if tgt.kind == UINT8 and dt != "U8":
            raise CheckpointError(f"tensor {name} has dtype {dt}, expected U8 (MXFP4 bytes)")
        if tgt.kind != UINT8 and dt not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {dt}, expected BF16 (or F16/F32)")


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

def load_checkpoint(path, device=None, dtype: torch.dtype = torch.bfloat16, progress: bool = True):
    """-> (config, global weights, per-layer weights) on ``device`` (see module docstring)."""
    from safetensors import safe_open

    from .ops import mxfp4_quantize

    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    device = torch.device(device if device is not None else "cpu")
    folder, layout, cfg = detect_layout(path)
    expected = original_names(cfg) if layout == "original" else hf_names(cfg, mxfp4=(layout == "hf-mxfp4"))
    headers = _files(folder)
    cfg_desc = (f"{layout} layout, num_hidden_layers={cfg.num_hidden_layers}, num_experts={cfg.num_experts}, "
                f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}")
    _check(headers, expected, cfg_desc)
    if device.type == "cuda":
        from .memory import check_weights_fit

        check_weights_fit(cfg, device, torch.empty((), dtype=dtype).element_size())

    weights: dict = {}
    layers: list[dict] = [{} for _ in range(cfg.num_hidden_layers)]
    parts: dict = {}
    total = sum(len(h) for h in headers.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"loading {os.path.basename(os.path.normpath(folder))}", unit="tensor")
    try:
        for file, h in headers.items():
            try:
                f = safe_open(file, framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{file}: cannot open: {e}") from e
            for name in h:
                tgt = expected[name]
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from e
                dest = weights if tgt.layer is None else layers[tgt.layer]
                if tgt.kind == UINT8:
                    dest[tgt.key] = t.to(device)
                elif tgt.key in ("w1_dense", "w2_dense"):
                    _quantize_dense(dest, tgt.key, t, device, mxfp4_quantize)
                elif tgt.part is not None:
                    got = parts.setdefault((tgt.layer, tgt.key), {})
                    got[tgt.part] = t.to(device=device, dtype=dtype)
                    if len(got) == 3:
                        dest[tgt.key] = torch.cat((got["q"], got["k"], got["v"])).contiguous()
                        del parts[(tgt.layer, tgt.key)]
                else:
                    dest[tgt.key] = t.to(device=device, dtype=dtype).contiguous()
                del t
                if bar is not None:
                    bar.update(1)
            del f
    finally:
        if bar is not None:
            bar.close()
    gshapes, lshapes = weight_shapes(cfg)
    for n in gshapes:
        if n not in weights:
            raise CheckpointError(f"weight {n} was not loaded")
    for i, spec in enumerate(lshapes):
        for n in spec:
            if n not in layers[i]:
                raise CheckpointError(f"layer {i}: weight {n} was not loaded")
        for n, (shape, kind) in spec.items():  # biases of dense experts etc. come in the model dtype
            if kind != UINT8 and layers[i][n].dtype != dtype:
                layers[i][n] = layers[i][n].to(dtype)
    return cfg, weights, layers


def _quantize_dense(dest: dict, key: str, t: torch.Tensor, device, mxfp4_quantize) -> None:
    """HF dense experts [E, in, out] -> MXFP4 blocks/scales of [E, out, in], one expert at a time."""
    E, K, N = t.shape
    prefix = "w1" if key == "w1_dense" else "w2"
    blocks = torch.empty((E, N, K // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.empty((E, N, K // 32), dtype=torch.uint8, device=device)
    for e in range(E):
        b, s = mxfp4_quantize(t[e].to(device=device, dtype=torch.float32).t().contiguous())
        blocks[e], scales[e] = b, s
    dest[prefix + "_blocks"], dest[prefix + "_scales"] = blocks, scales
