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

`scenic_name` maps our parameter names one to one onto Scenic's ViViT-FE names.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
from typing import Any, Callable, NamedTuple

import numpy as np
import safetensors.torch
import torch

from sfa_vivit.checkpoints import CheckpointError, check_shape
from sfa_vivit.models.vivit import ViViT, inflate_patch_kernel, resample_positions_2d
from sfa_vivit.storage import join, open_url, url_to_fs

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
