"""Foreign formats: image ViT checkpoints imported into the spatial encoder, and Scenic's names.

Image checkpoints (`load_image_vit`), three families, detected from the files when `format` is omitted:

- ``hf``: a Hugging Face ViT directory (``config.json`` + ``model.safetensors``, sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin``), as written by ``ViTModel.save_pretrained``.
  Names ``[vit.]embeddings.*``, ``[vit.]encoder.layer.{i}.*`` (and the in-memory ``layers.{i}.*`` names of
  newer releases). Numerics from config.json: ``layer_norm_eps`` (1e-12 by default there), ``hidden_act``.
- ``timm``: a timm-named state dict (``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
  ``torch.load(weights_only=True)``): ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``blocks.{i}.attn.qkv`` (fused q/k/v), ``norm``. timm ViTs use LayerNorm eps 1e-6 and exact GELU.
- ``npz``: a Flax ``.npz``, either the original Google ViT release (``Transformer/encoderblock_{i}/``
  ``LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3``, positions under
  ``Transformer/posembed_input``) or big_vision / Scenic (``MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0``, positions at ``pos_embedding``, optionally under ``params/`` or ``params/img/`` and
  optionally with the blocks scanned into one stacked ``encoderblock``). Flax uses eps 1e-6 and tanh GELU.

`scenic_name` maps our parameter names one to one onto Scenic's ViViT-FE names; `load_scenic` and
`save_scenic` read and write Scenic ViViT factorised-encoder checkpoints (Flax msgpack) through it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
from typing import Any, Callable, NamedTuple

import numpy as np
import safetensors.torch
import torch

from sfa_vivit.core.storage import join, open_url, url_to_fs, write_bytes_atomic
from sfa_vivit.models.checkpoints import CheckpointError, check_shape
from sfa_vivit.models.vivit import ViViT, ViViTConfig, head_rows, inflate_patch_kernel, resample_positions_2d

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("hf", "timm", "npz")


# ----------------------------------------------------------------------------------------------
# Image ViT import
# ----------------------------------------------------------------------------------------------

class _ImageViT(NamedTuple):
    """An image ViT in our spatial-encoder naming: `patch_kernel` (D, C, p, p), `patch_bias`,
    optional `cls` (1, 1, D), `pos` (1, [1+]N, D), and `spatial.blocks.{i}.*` / `spatial.norm.*`."""
    tensors: dict[str, torch.Tensor]
    layer_norm_eps: float
    activation: str
    has_cls: bool


@torch.no_grad()
def load_image_vit(model: ViViT, source: str | os.PathLike, format: str | None = None) -> dict[str, Any]:
    """Initialise `model`'s tubelet embedding and spatial encoder from an image ViT checkpoint.

    The 2D patch kernel is inflated over the tubelet by `model.config.tubelet_init`; the CLS token is
    copied (Scenic leaves it at zero); the patch-grid position embedding is resized bicubically when
    the image size differs; the model's `layer_norm_eps` and `activation` are set from the source so
    that outputs match it. The temporal encoder, adapter and head are left untouched.

    source: a local path or fsspec URL (hf directory, timm state-dict file, or .npz).
    format: 'hf', 'timm' or 'npz'; detected when None.
    Returns a summary dict (format, source, numerics, whether positions were resized).
    Raises CheckpointError for an unrecognised format, a missing tensor, or a tensor whose shape does
    not fit (naming the tensor and both shapes).
    """
    source = os.fspath(source)
    fmt = format or detect_image_format(source)
    if fmt not in IMAGE_FORMATS:
        raise CheckpointError(f"unknown image checkpoint format {fmt!r}; choose one of {list(IMAGE_FORMATS)}")
    reader: Callable[[str], _ImageViT] = {"hf": _read_hf, "timm": _read_timm, "npz": _read_npz}[fmt]
    vit = reader(source)
    resized = _copy_image_vit(model, vit, source)
    summary = {"format": fmt, "source": source, "layer_norm_eps": vit.layer_norm_eps,
               "activation": vit.activation, "cls_copied": vit.has_cls and model.spatial.cls is not None,
               "positions_resized": resized}
    log.info("initialised spatial encoder from %s", summary)
    return summary


def detect_image_format(source: str) -> str:
    """'hf' for a folder with config.json, 'npz' for .npz, 'timm' for a state dict with timm names."""
    fs, path = url_to_fs(source)
    if not fs.exists(path):
        raise CheckpointError(f"image checkpoint {source!r} does not exist")
    if fs.isdir(path):
        if fs.exists(join(path, "config.json")):
            return "hf"
        raise CheckpointError(f"unrecognised checkpoint format: {source!r} is a folder without config.json "
                              "(expected a Hugging Face ViT folder, a timm state-dict file or a .npz)")
    if path.endswith(".npz"):
        return "npz"
    if path.endswith((".safetensors", ".pt", ".pth", ".bin")):
        keys = set(_read_state_dict(source))
        if any(k.endswith("patch_embed.proj.weight") for k in keys):
            return "timm"
        if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
            raise CheckpointError(f"{source!r} holds Hugging Face ViT weights: pass the folder that has "
                                  "its config.json, so that its numerics (layer_norm_eps, hidden_act) are known")
        raise CheckpointError(f"unrecognised checkpoint format: {source!r} has neither timm ViT names "
                              f"(patch_embed.proj.weight, blocks.N.attn.qkv.weight) nor Hugging Face names; "
                              f"first keys: {sorted(keys)[:5]}")
    raise CheckpointError(f"unrecognised checkpoint format: {source!r} (expected a Hugging Face ViT folder, "
                          ".safetensors/.pt/.pth/.bin timm state dict, or .npz)")


def _read_hf(source: str) -> _ImageViT:
    fs, path = url_to_fs(source)
    with fs.open(join(path, "config.json"), "rb") as f:
        config = json.load(f)
    if config.get("model_type", "vit") != "vit":
        raise CheckpointError(f"{source}: config.json has model_type={config.get('model_type')!r}, expected 'vit'")
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if fs.exists(join(path, name)):
            break
    else:
        raise CheckpointError(f"{source}: no model.safetensors, model.safetensors.index.json or "
                              "pytorch_model.bin beside config.json")
    if name.endswith(".index.json"):
        with fs.open(join(path, name), "rb") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        raw = {}
        for shard in shards:
            raw.update(_read_state_dict(join(source, shard)))
    else:
        raw = _read_state_dict(join(source, name))
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_fast": "gelu_tanh"}.get(config.get("hidden_act", "gelu"))
    if act is None:
        raise CheckpointError(f"{source}: hidden_act={config.get('hidden_act')!r} is not supported "
                              "(gelu, gelu_new, gelu_pytorch_tanh)")
    rules = [
        (r"(?:vit\.)?embeddings\.cls_token", "cls"),
        (r"(?:vit\.)?embeddings\.position_embeddings", "pos"),
        (r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.weight", "patch_kernel"),
        (r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.bias", "patch_bias"),
        (r"(?:vit\.)?layernorm\.(weight|bias)", r"spatial.norm.\1"),
        # On-disk names, then the in-memory names of newer transformers releases.
        (r"(?:vit\.)?encoder\.layer\.(\d+)\.layernorm_before\.", r"spatial.blocks.\1.norm1."),
        (r"(?:vit\.)?encoder\.layer\.(\d+)\.layernorm_after\.", r"spatial.blocks.\1.norm2."),
        (r"(?:vit\.)?encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"spatial.blocks.\1.attn.\2."),
        (r"(?:vit\.)?encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"spatial.blocks.\1.attn.out."),
        (r"(?:vit\.)?encoder\.layer\.(\d+)\.intermediate\.dense\.", r"spatial.blocks.\1.mlp.fc1."),
        (r"(?:vit\.)?encoder\.layer\.(\d+)\.output\.dense\.", r"spatial.blocks.\1.mlp.fc2."),
        (r"(?:vit\.)?layers\.(\d+)\.layernorm_(before)\.", r"spatial.blocks.\1.norm1."),
        (r"(?:vit\.)?layers\.(\d+)\.layernorm_(after)\.", r"spatial.blocks.\1.norm2."),
        (r"(?:vit\.)?layers\.(\d+)\.attention\.([qkv])_proj\.", None),
        (r"(?:vit\.)?layers\.(\d+)\.attention\.o_proj\.", r"spatial.blocks.\1.attn.out."),
        (r"(?:vit\.)?layers\.(\d+)\.mlp\.fc([12])\.", r"spatial.blocks.\1.mlp.fc\2."),
    ]
    qkv = {"q": "query", "k": "key", "v": "value"}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        for pattern, target in rules:
            m = re.match(pattern, key)
            if not m:
                continue
            if target is None:   # q_proj/k_proj/v_proj
                target_key = f"spatial.blocks.{m.group(1)}.attn.{qkv[m.group(2)]}." + key[m.end():]
            else:
                target_key = m.expand(target) + key[m.end():]
            tensors[target_key] = value
            break
    if not config.get("qkv_bias", True):
        _zero_missing_qkv_bias(tensors)
    return _ImageViT(tensors, float(config.get("layer_norm_eps", 1e-12)), act, "cls" in tensors)


def _read_timm(source: str) -> _ImageViT:
    raw = _read_state_dict(source)
    raw = {k.removeprefix("module.").removeprefix("model."): v for k, v in raw.items()}
    for unsupported in ("reg_token", "fc_norm.weight"):
        if unsupported in raw:
            what = {"reg_token": "register tokens", "fc_norm.weight": "fc_norm (pooling before the final LayerNorm)"}
            raise CheckpointError(f"{source}: this timm ViT uses {what[unsupported]}, which the ViViT spatial "
                                  "encoder does not have")
    tensors: dict[str, torch.Tensor] = {}
    simple = {"cls_token": "cls", "pos_embed": "pos", "patch_embed.proj.weight": "patch_kernel",
              "patch_embed.proj.bias": "patch_bias", "norm.weight": "spatial.norm.weight",
              "norm.bias": "spatial.norm.bias"}
    block_parts = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn.out", "mlp.fc1": "mlp.fc1",
                   "mlp.fc2": "mlp.fc2"}
    for key, value in raw.items():
        if key in simple:
            tensors[simple[key]] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        i, part, kind = m.groups()
        if part == "attn.qkv":
            for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                tensors[f"spatial.blocks.{i}.attn.{name}.{kind}"] = chunk
        elif part in block_parts:
            tensors[f"spatial.blocks.{i}.{block_parts[part]}.{kind}"] = value
    _zero_missing_qkv_bias(tensors)
    return _ImageViT(tensors, 1e-6, "gelu", "cls" in tensors)


def _read_npz(source: str) -> _ImageViT:
    with open_url(source, "rb") as f:
        data = f.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            w = {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable npz"
        raise CheckpointError(f"unrecognised checkpoint format: {source!r} is not a readable .npz ({e})") from e
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/", "img/")
                   if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise CheckpointError(f"unrecognised checkpoint format: {source!r} has no 'embedding/kernel' "
                              f"(a Flax ViT .npz); first keys: {sorted(w)[:5]}")
    w = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float()

    tensors: dict[str, torch.Tensor] = {
        "patch_kernel": t(w["embedding/kernel"]).permute(3, 2, 0, 1),   # (p, p, C, D) → (D, C, p, p)
        "patch_bias": t(w["embedding/bias"]),
        "spatial.norm.weight": t(w["Transformer/encoder_norm/scale"]),
        "spatial.norm.bias": t(w["Transformer/encoder_norm/bias"]),
    }
    if "cls" in w:
        tensors["cls"] = t(w["cls"])
    pos_key = next((k for k in ("pos_embedding", "Transformer/posembed_input/pos_embedding") if k in w), None)
    if pos_key is None:
        raise CheckpointError(f"{source}: no position embedding (pos_embedding or "
                              "Transformer/posembed_input/pos_embedding)")
    tensors["pos"] = t(w[pos_key])

    # Block layout: original ViT release vs big_vision/Scenic; per-block keys or one scanned stack.
    scanned = any(k.startswith("Transformer/encoderblock/") for k in w)
    probe = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    mha, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
                     if f"{probe}MultiHeadDotProductAttention_1/query/kernel" in w
                     else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    if scanned:
        depth = w[f"{probe}LayerNorm_0/scale"].shape[0]
    else:
        depth = len({m.group(1) for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    for i in range(depth):
        def get(name: str) -> torch.Tensor:
            if scanned:
                return t(w[f"Transformer/encoderblock/{name}"][i])
            return t(w[f"Transformer/encoderblock_{i}/{name}"])

        b = f"spatial.blocks.{i}."
        tensors[b + "norm1.weight"], tensors[b + "norm1.bias"] = get("LayerNorm_0/scale"), get("LayerNorm_0/bias")
        tensors[b + "norm2.weight"], tensors[b + "norm2.bias"] = get(f"{ln2}/scale"), get(f"{ln2}/bias")
        for name in ("query", "key", "value"):
            kernel = get(f"{mha}/{name}/kernel")               # (D, nh, hs)
            tensors[b + f"attn.{name}.weight"] = kernel.reshape(kernel.shape[0], -1).T
            tensors[b + f"attn.{name}.bias"] = get(f"{mha}/{name}/bias").reshape(-1)
        kernel = get(f"{mha}/out/kernel")                      # (nh, hs, D)
        tensors[b + "attn.out.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
        tensors[b + "attn.out.bias"] = get(f"{mha}/out/bias")
        for j in (0, 1):
            tensors[b + f"mlp.fc{j + 1}.weight"] = get(f"{mlp}/Dense_{j}/kernel").T
            tensors[b + f"mlp.fc{j + 1}.bias"] = get(f"{mlp}/Dense_{j}/bias")
    return _ImageViT(tensors, 1e-6, "gelu_tanh", "cls" in tensors)


def _zero_missing_qkv_bias(tensors: dict[str, torch.Tensor]) -> None:
    # Checkpoints trained without q/k/v biases: our projections have them, so they become zero.
    for key in [k for k in tensors if re.search(r"attn\.(query|key|value)\.weight$", k)]:
        bias = key[: -len("weight")] + "bias"
        if bias not in tensors:
            tensors[bias] = torch.zeros(tensors[key].shape[0])


def _copy_image_vit(model: ViViT, vit: _ImageViT, source: str) -> bool:
    """Copy an image ViT into model; returns whether the position grid was resized."""
    config = model.config
    src = dict(vit.tensors)
    spatial_keys = [k for k in model.state_dict() if k.startswith("spatial.blocks.") or k.startswith("spatial.norm.")]
    src_depth = len({k.split(".")[2] for k in src if k.startswith("spatial.blocks.")})
    if src_depth != config.spatial_depth:
        raise CheckpointError(f"{source}: image ViT has {src_depth} blocks but the model's spatial encoder "
                              f"has spatial_depth={config.spatial_depth}")
    missing = [k for k in ("patch_kernel", "patch_bias", "pos") + tuple(spatial_keys) if k not in src]
    if missing:
        raise CheckpointError(f"{source}: image checkpoint lacks tensor(s) {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}")

    kernel = src.pop("patch_kernel")
    expected_kernel = (config.width, config.in_channels, config.patch, config.patch)
    check_shape(source, "patch embedding kernel (D, C, p, p)", tuple(kernel.shape), expected_kernel)
    embedding = {"embedding.weight": inflate_patch_kernel(kernel.float(), config.tubelet, config.tubelet_init),
                 "embedding.bias": src.pop("patch_bias")}

    pos = src.pop("pos")
    expected_pos = (1, config.grid**2 + int(vit.has_cls), config.width)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != config.width:
        check_shape(source, "position embedding", tuple(pos.shape), expected_pos)
    pos = pos[0]
    grid_pos = pos[1:] if vit.has_cls else pos
    resized = grid_pos.shape[0] != config.grid**2
    grid_pos = resample_positions_2d(grid_pos, config.grid)
    model_pos = model.spatial.pos_embedding.detach()[0].clone()
    if model.spatial.cls is not None:
        if vit.has_cls:
            model_pos[0] = pos[0]
        model_pos[1:] = grid_pos
    else:
        model_pos[:] = grid_pos
    cls = src.pop("cls", None)
    own = model.state_dict()
    updates = {k: v for k, v in {**src, **embedding}.items() if k in own}
    updates["spatial.pos_embedding"] = model_pos[None]
    if model.spatial.cls is not None:
        if cls is not None:
            updates["spatial.cls"] = cls.reshape(1, 1, -1)
        else:
            log.warning("%s has no CLS token; the spatial CLS token and its position keep their initial values",
                        source)

    # Check every shape, in the model's order, before changing anything: a bad checkpoint leaves
    # the model as it was and the first mismatch reported is the same on every run.
    for key in own:
        if key in updates:
            check_shape(source, key, tuple(updates[key].shape), tuple(own[key].shape))
    for key, value in updates.items():
        own[key].copy_(value)
    _set_numerics(model, vit.layer_norm_eps, vit.activation)
    return resized


def _set_numerics(model: ViViT, eps: float, activation: str) -> None:
    """Make every LayerNorm and GELU in the model follow the checkpoint's conventions."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = eps
        if hasattr(module, "activation") and isinstance(module.activation, str):
            module.activation = activation
    model.config = dataclasses.replace(model.config, layer_norm_eps=eps, activation=activation)


def _read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A .safetensors or torch state-dict file from any fsspec URL, never unpickling arbitrary code."""
    with open_url(url, "rb") as f:
        data = f.read()
    try:
        if url.endswith(".safetensors"):
            return dict(safetensors.torch.load(data))
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report what was being read
        raise CheckpointError(f"unrecognised checkpoint format: cannot read {url!r} as a state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"unrecognised checkpoint format: {url!r} does not hold a dict of tensors")
    return state


# ----------------------------------------------------------------------------------------------
# Scenic names
# ----------------------------------------------------------------------------------------------

_SCENIC_BLOCK = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1", "attn": "MultiHeadDotProductAttention_0",
                 "mlp.fc1": "MlpBlock_0/Dense_0", "mlp.fc2": "MlpBlock_0/Dense_1"}
_SCENIC_ENCODER = {"spatial": "SpatialTransformer", "temporal": "TemporalTransformer"}


def scenic_name(name: str) -> str:
    """Our parameter name → its Scenic ViViT-FE name (one to one; adapter names have an 'adapter/' path).

    e.g. 'spatial.blocks.3.attn.query.weight'
         → 'SpatialTransformer/encoderblock_3/MultiHeadDotProductAttention_0/query/kernel'
    """
    leaf = {"weight": "kernel", "bias": "bias"}
    parts = name.split(".")
    if parts[0] == "embedding":
        return f"embedding/{leaf[parts[1]]}"
    if parts[0] == "head":
        return f"output_projection/{leaf[parts[1]]}"
    if parts[0] == "pre_logits":
        return f"pre_logits/{leaf[parts[1]]}"
    if parts[0] == "adapter":
        return f"adapter/{parts[1]}/{leaf[parts[2]]}"
    enc = _SCENIC_ENCODER[parts[0]]
    if parts[1] == "cls":
        return f"cls_{enc}"
    if parts[1] == "pos_embedding":
        return f"{enc}/posembed_input/pos_embedding"
    if parts[1] == "norm":
        return f"{enc}/encoder_norm/{'scale' if parts[2] == 'weight' else 'bias'}"
    block, rest = parts[2], parts[3:]
    sub = ".".join(rest[:-1])
    is_norm = rest[0] in ("norm1", "norm2")
    if rest[0] == "attn":
        scenic_sub = f"{_SCENIC_BLOCK['attn']}/{rest[1]}"
    else:
        scenic_sub = _SCENIC_BLOCK[sub]
    kind = ("scale" if rest[-1] == "weight" else "bias") if is_norm else leaf[rest[-1]]
    return f"{enc}/encoderblock_{block}/{scenic_sub}/{kind}"


# ----------------------------------------------------------------------------------------------
# Scenic ViViT factorised-encoder checkpoints (Flax msgpack)
# ----------------------------------------------------------------------------------------------

# Flax's msgpack extension types (flax/serialization.py): an ndarray is ExtType 1 holding
# msgpack((shape, dtype name, C-order bytes)); a numpy scalar ExtType 3 holding msgpack((dtype, bytes)).
# Arrays over 2**30 bytes are written as {'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}.
_FLAX_NDARRAY, _FLAX_COMPLEX, _FLAX_NPSCALAR = 1, 2, 3
_FLAX_CHUNKED = "__msgpack_chunked_array__"

# Every parameter name a Scenic ViViT factorised encoder (`SpaceTimeViViT`, classification or multi-head) has.
_SCENIC_FE_NAME = re.compile(
    r"^(?:embedding/(?:kernel|bias)"
    r"|cls_(?:Spatial|Temporal)Transformer"
    r"|(?:Spatial|Temporal)Transformer/(?:posembed_input/pos_embedding|encoder_norm/(?:scale|bias)"
    r"|encoderblock_\d+/(?:LayerNorm_[01]/(?:scale|bias)"
    r"|MultiHeadDotProductAttention_0/(?:query|key|value|out)/(?:kernel|bias)"
    r"|MlpBlock_0/Dense_[01]/(?:kernel|bias)))"
    r"|pre_logits/(?:kernel|bias)|output_projection/(?:kernel|bias))$")

# Scenic's EPIC-KITCHENS multi-head model splits one output layer as class_splits [300, 97],
# split_names [noun, verb] (scenic/projects/vivit/configs/epic_kitchens/...): nouns first.
EPIC_KITCHENS_HEADS = {"noun": 300, "verb": 97}


def _flax_ext(code: int, data: bytes) -> Any:
    import msgpack
    if code in (_FLAX_NDARRAY, _FLAX_NPSCALAR):       # both hold (shape, dtype name, C-order bytes)
        shape, dtype, buffer = msgpack.unpackb(data, raw=False)
        array = _array(buffer, dtype).reshape(shape)
        return array if code == _FLAX_NDARRAY else array[()]
    if code == _FLAX_COMPLEX:
        real, imag = msgpack.unpackb(data, raw=False)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _array(buffer: bytes, dtype: str) -> np.ndarray:
    """Bytes of a Flax array → numpy; bfloat16 (which numpy cannot name without ml_dtypes) as float32: its
    bits are the top half of a float32's."""
    if dtype == "bfloat16":
        return (np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(buffer, dtype=np.dtype(dtype))


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(_FLAX_CHUNKED):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(url: str) -> dict[str, Any]:
    """A Flax checkpoint (`flax.serialization.to_bytes`, what `save_checkpoint` writes in msgpack mode) at
    any fsspec URL → a nested dict of numpy arrays. Raises CheckpointError naming the file when it is not one."""
    import msgpack
    with open_url(url, "rb") as f:
        data = f.read()
    try:
        tree = msgpack.unpackb(data, ext_hook=_flax_ext, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not a Flax msgpack checkpoint"
        raise CheckpointError(f"{url} is not a Flax msgpack checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{url} holds a msgpack {type(tree).__name__}, not a Flax state dict")
    return _unchunk(tree)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _scenic_params(tree: dict[str, Any], url: str) -> tuple[dict[str, np.ndarray], int | None, str]:
    """The parameter tree of a Scenic checkpoint, flattened to 'a/b/c' names, its step, and where it was
    found: the ViViT trainer's train state (`optimizer/target`), scenic.train_lib's (`params`), a Flax
    variables dict (`params`) or a bare parameter tree."""
    step = tree.get("global_step")
    for path in (("optimizer", "target"), ("params",), ()):
        node: Any = tree
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and ("embedding" in node or "Transformer" in node or "cls" in node):
            flat = _flatten(node)
            bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
            if bad:
                raise CheckpointError(f"{url}: parameter {bad[0]} is not an array")
            return flat, None if step is None else int(np.asarray(step)), "/".join(path) or "(root)"
    raise CheckpointError(f"{url} holds no ViViT parameter tree: looked under optimizer/target (Scenic's ViViT "
                          f"trainer), params (scenic.train_lib) and the root; top-level keys: {sorted(tree)[:8]}")


def _scenic_config(params: dict[str, np.ndarray], url: str, heads: dict[str, int] | None) -> ViViTConfig:
    """A ViViT-FE config read from the shapes of Scenic parameters. Raises CheckpointError naming the first
    parameter that is not one of a ViViT factorised encoder."""
    for name in params:
        if not _SCENIC_FE_NAME.match(name):
            hint = (" (an unfactorised ViViT or another attention type: only the factorised encoder, "
                    "Scenic's SpaceTimeViViT, is supported)" if name.startswith(("Transformer/", "cls")) else "")
            raise CheckpointError(f"{url}: parameter {name} {tuple(params[name].shape)} is not one of a Scenic "
                                  f"ViViT factorised-encoder model{hint}")
    for needed in ("embedding/kernel", "SpatialTransformer/posembed_input/pos_embedding",
                   "TemporalTransformer/posembed_input/pos_embedding", "output_projection/kernel",
                   "SpatialTransformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
                   "SpatialTransformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"):
        if needed not in params:
            raise CheckpointError(f"{url}: no parameter {needed}: not a Scenic ViViT factorised-encoder checkpoint")
    kernel = params["embedding/kernel"]                     # (t, p, p, C, D)
    if kernel.ndim != 5 or kernel.shape[1] != kernel.shape[2]:
        raise CheckpointError(f"{url}: parameter embedding/kernel has shape {kernel.shape}, not a 3D tubelet "
                              "kernel (t, p, p, C, D) with square patches")
    tubelet, patch, _, channels, width = kernel.shape
    token = "cls_SpatialTransformer" in params
    if token != ("cls_TemporalTransformer" in params):
        raise CheckpointError(f"{url}: one encoder has a CLS token and the other not; Scenic's classifier "
                              "applies to both")

    def depth(encoder: str) -> int:
        return len({m.group(1) for k in params if (m := re.match(rf"{encoder}/encoderblock_(\d+)/", k))})

    def block(encoder: str) -> tuple[int, int]:
        query = params[f"{encoder}/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]   # (D, nh, hs)
        return query.shape[1], params[f"{encoder}/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1]

    spatial_tokens = params["SpatialTransformer/posembed_input/pos_embedding"].shape[1] - token
    grid = math.isqrt(spatial_tokens)
    if grid * grid != spatial_tokens:
        raise CheckpointError(f"{url}: SpatialTransformer/posembed_input/pos_embedding holds {spatial_tokens} "
                              "patch positions, not a square grid")
    temporal_tokens = params["TemporalTransformer/posembed_input/pos_embedding"].shape[1] - token
    heads_s, mlp_s = block("SpatialTransformer")
    temporal_depth = depth("TemporalTransformer")
    heads_t, mlp_t = block("TemporalTransformer") if temporal_depth else (heads_s, mlp_s)
    representation = params["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in params else None
    total = params["output_projection/kernel"].shape[1]
    if heads is None and total == sum(EPIC_KITCHENS_HEADS.values()):
        heads = dict(EPIC_KITCHENS_HEADS)
        log.info("%s: %d outputs, read as Scenic's EPIC-KITCHENS heads %s (pass heads= to split otherwise)",
                 url, total, heads)
    if heads is not None and sum(heads.values()) != total:
        raise CheckpointError(f"{url}: output_projection has {total} outputs but heads {heads} add up to "
                              f"{sum(heads.values())}")
    try:
        return ViViTConfig(num_frames=temporal_tokens * tubelet, image_size=grid * patch,
                           num_classes=dict(heads) if heads else total, width=width,
                           spatial_depth=depth("SpatialTransformer"), temporal_depth=temporal_depth,
                           heads=heads_s, mlp_dim=mlp_s,
                           temporal_heads=heads_t if heads_t != heads_s else None,
                           temporal_mlp_dim=mlp_t if mlp_t != mlp_s else None,
                           patch=patch, tubelet=tubelet, in_channels=channels,
                           classifier="token" if token else "gap", representation_size=representation,
                           layer_norm_eps=1e-6, activation="gelu_tanh")   # Flax LayerNorm, jax.nn.gelu (tanh)
    except ValueError as e:
        raise CheckpointError(f"{url}: the shapes give no valid ViViT-FE model ({e})") from None


def _scenic_layout(name: str, config: ViViTConfig) -> tuple[Callable, Callable]:
    """(ours → Scenic, Scenic → ours) array transforms for our parameter `name`."""
    parts = name.split(".")
    if name == "embedding.weight":                          # (D, C, t, p, p) ↔ (t, p, p, C, D)
        return (lambda a: a.permute(2, 3, 4, 1, 0)), (lambda a: a.permute(4, 3, 0, 1, 2))
    if len(parts) > 4 and parts[3] == "attn":
        heads = config.heads if parts[0] == "spatial" else (config.temporal_heads or config.heads)
        width, kind = config.width, parts[-1]
        if parts[4] in ("query", "key", "value"):
            if kind == "weight":                            # (nh*hs, D) ↔ (D, nh, hs)
                return (lambda a: a.T.reshape(width, heads, -1)), (lambda a: a.reshape(width, -1).T)
            return (lambda a: a.reshape(heads, -1)), (lambda a: a.reshape(-1))
        if kind == "weight":                                # out: (D, nh*hs) ↔ (nh, hs, D)
            return (lambda a: a.T.reshape(heads, -1, width)), (lambda a: a.reshape(-1, width).T)
    if parts[-1] == "weight" and parts[-2] not in ("norm", "norm1", "norm2"):
        return (lambda a: a.T), (lambda a: a.T)             # Dense: (out, in) ↔ (in, out)
    return (lambda a: a), (lambda a: a)


def load_scenic(source: str | os.PathLike, *, num_frames: int | None = None,
                heads: dict[str, int] | None = None) -> ViViT:
    """A ViViT from a Scenic ViViT factorised-encoder checkpoint (Flax msgpack, local path or any fsspec URL).

    Reads the training state Scenic's ViViT trainer writes (parameters under `optimizer/target`, step beside
    them), scenic.train_lib's (`params`) or a bare parameter tree. The architecture (width, heads, depths,
    tubelet, patch, MLP widths, classifier, pre-logits, class count) comes from the parameters' shapes;
    numerics follow Scenic (LayerNorm eps 1e-6, tanh GELU). `num_frames`: resize the temporal position
    embedding to this many frames as Scenic does (linear, end points kept, CLS position kept). `heads`:
    split the output layer into named heads, in Scenic's `class_splits` order (397 outputs are read as
    EPIC-KITCHENS' {'noun': 300, 'verb': 97} unless given). The step is in `model.scenic_step`.
    Raises CheckpointError naming the file and the first parameter that does not fit.
    """
    url = os.fspath(source)
    params, step, where = _scenic_params(read_flax_msgpack(url), url)
    config = _scenic_config(params, url, heads)
    model = ViViT(config)
    own = model.state_dict()
    wanted = {scenic_name(k): k for k in own}
    missing = [name for name in wanted if name not in params]
    if missing:
        raise CheckpointError(f"{url}: no parameter {missing[0]} (a ViViT-FE model of these shapes has it)")
    state = {}
    for scenic_key, ours in wanted.items():
        array = params[scenic_key]
        value = _scenic_layout(ours, config)[1](torch.from_numpy(np.array(array, dtype=np.float32)))
        check_shape(url, scenic_key, tuple(value.shape), tuple(own[ours].shape))
        state[ours] = value.contiguous()
    model.load_state_dict(state)
    if num_frames is not None and num_frames != config.num_frames:
        model.resize_temporal(num_frames)
    model.scenic_step = step
    log.info("loaded Scenic ViViT-FE %s (%s, step %s): %s", url, where, step,
             {k: getattr(model.config, k) for k in ("width", "spatial_depth", "temporal_depth", "heads", "patch",
                                                     "tubelet", "num_frames", "image_size", "classifier")})
    return model


def save_scenic(model: ViViT, target: str | os.PathLike, *, step: int = 0, layout: str = "train_state") -> str:
    """Write `model` as a Scenic ViViT-FE checkpoint (Flax msgpack) at `target` (any fsspec URL, written
    atomically): layout 'train_state' is what Scenic's ViViT trainer restores (parameters under
    `optimizer/target`, `global_step` = `step`), 'params' a bare parameter tree. A model with an SFA
    adapter has no Scenic counterpart and is refused. Returns the URL written."""
    import msgpack

    if layout not in ("train_state", "params"):
        raise ValueError(f"layout={layout!r} must be 'train_state' or 'params'")
    if model.adapter is not None:
        raise CheckpointError("this model has an SFA adapter, which Scenic's ViViT has no place for")
    if model.config.activation != "gelu_tanh" or model.config.layer_norm_eps != 1e-6:
        log.warning("the model uses activation=%s, layer_norm_eps=%g; Scenic's ViViT uses gelu_tanh and 1e-6, "
                    "so its outputs will differ slightly", model.config.activation, model.config.layer_norm_eps)
    params: dict[str, Any] = {}
    state = dict(model.state_dict())
    classes = model.config.num_classes
    if isinstance(classes, dict) and set(classes) == set(EPIC_KITCHENS_HEADS) and list(classes) != list(
            EPIC_KITCHENS_HEADS):          # Scenic's EPIC model splits its one output layer nouns first
        state["head.weight"] = head_rows(model, list(EPIC_KITCHENS_HEADS), "weight")
        state["head.bias"] = head_rows(model, list(EPIC_KITCHENS_HEADS), "bias")
    for name, tensor in state.items():
        array = _scenic_layout(name, model.config)[0](tensor.detach().float().cpu()).contiguous().numpy()
        node = params
        *path, leaf = scenic_name(name).split("/")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = array
    tree = params if layout == "params" else {
        "global_step": np.asarray(step, dtype=np.int32),
        "optimizer": {"state": {"step": np.asarray(step, dtype=np.int32), "param_states": {}}, "target": params},
        "model_state": {}, "rng": np.zeros(2, dtype=np.uint32), "accum_train_time": 0}

    def ext(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes()), use_bin_type=True)
            return msgpack.ExtType(_FLAX_NDARRAY, payload)
        raise TypeError(f"cannot write {type(value).__name__} into a Flax checkpoint")

    url = os.fspath(target)
    write_bytes_atomic(url, msgpack.packb(_sorted(tree), default=ext, use_bin_type=True))
    return url


def _sorted(tree: Any) -> Any:
    # Flax writes state dicts with their keys in sorted order (flax.serialization.to_state_dict of a dict).
    return {k: _sorted(tree[k]) for k in sorted(tree)} if isinstance(tree, dict) else tree


_RUN_ARCHITECTURE = ("width", "spatial_depth", "temporal_depth", "heads", "mlp_dim", "temporal_heads",
                     "temporal_mlp_dim", "patch", "tubelet", "in_channels", "classifier", "representation_size",
                     "layer_norm_eps", "activation")


def import_scenic(source: str | os.PathLike, out: str | os.PathLike, *, num_frames: int | None = None,
                  heads: dict[str, int] | None = None) -> str:
    """`load_scenic(source)` written as a committed checkpoint of ours at `out`, so that `sfa evaluate OUT`
    and `sfa train --init OUT` (stage 2 included) start from it. The checkpoint records where it came from
    and, as a run would, the architecture settings (`variant`, `model.*`, `image_size`) that `--init`
    hands on to the run it starts. Returns `out`."""
    from sfa_vivit.models import checkpoints
    from sfa_vivit.models.vivit import VARIANTS
    model = load_scenic(source, num_frames=num_frames, heads=heads)
    c = model.config
    sizes = {k: getattr(c, k) for k in _RUN_ARCHITECTURE}
    variant = next((name for name, v in VARIANTS.items() if all(sizes.get(k) == n for k, n in v.items())), "B")
    extra = {"imported_from": {"format": "scenic", "source": os.fspath(source), "step": model.scenic_step},
             "config": {"variant": variant, "model": sizes, "image_size": c.image_size}}
    return checkpoints.save(model, os.fspath(out), extra=extra)


def export_scenic(checkpoint: str | os.PathLike, target: str | os.PathLike, *, layout: str = "train_state") -> str:
    """Our checkpoint (or a run folder's final model) at `checkpoint` → a Scenic ViViT-FE checkpoint at
    `target` (`save_scenic`). Returns `target`."""
    from sfa_vivit.models import checkpoints
    url = checkpoints.resolve_model(os.fspath(checkpoint))
    model, extra = checkpoints.load(url)
    step = (extra.get("trainer") or {}).get("step") or (extra.get("imported_from") or {}).get("step") or 0
    return save_scenic(model, target, step=int(step), layout=layout)
