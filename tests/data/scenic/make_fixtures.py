"""Generate Scenic ViViT factorised-encoder reference fixtures.

Run by hand, in a throwaway JAX/Flax virtualenv (NOT the project's venv; no
torch needed), with a checkout of google-research/scenic given on the command
line:

    /tmp/scenic-venv/bin/python tests/data/scenic/make_fixtures.py \
        --scenic /tmp/scenic-src

No Scenic code is copied into this repository: the script imports Scenic's own
``scenic.projects.vivit.model`` from the given path, builds the Flax model with
random init, perturbs every parameter, runs an eval-mode forward pass on a fixed
random video and writes, per configuration:

  <name>.msgpack         checkpoint bytes laid out as a Scenic trainer writes
                         them (flax.serialization.to_bytes of the TrainState)
  <name>.params.msgpack  (some configs) bare parameter tree
  <name>.npz             input video, logits, debug intermediates, config JSON

See README.md next to this file.
"""

import argparse
import json
import os
import sys
import types
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# Fixed video shape: (B, T, H, W, 3).
BATCH = 2
NUM_FRAMES = 8
IMAGE_SIZE = 32


def _install_stand_ins():
    """Light stand-ins for heavy imports the forward pass does not use.

    scenic/projects/baselines/vit.py does `from tensorflow.io import gfile`
    (used only for loading big_vision .npz checkpoints, never in a forward
    pass). Nothing else needs TensorFlow, so a bare module stands in for it.
    """
    if "tensorflow" in sys.modules:
        return
    tf = types.ModuleType("tensorflow")
    tf_io = types.ModuleType("tensorflow.io")
    gfile = types.ModuleType("tensorflow.io.gfile")

    def _unavailable(*args, **kwargs):
        raise RuntimeError("tensorflow stand-in: gfile is not available")

    for fn in ("GFile", "glob", "exists", "makedirs", "listdir", "remove"):
        setattr(gfile, fn, _unavailable)
    tf.io = tf_io
    tf_io.gfile = gfile
    sys.modules["tensorflow"] = tf
    sys.modules["tensorflow.io"] = tf_io
    sys.modules["tensorflow.io.gfile"] = gfile


# ---------------------------------------------------------------------------
# Configurations.
# ---------------------------------------------------------------------------

CONFIGS = [
    # a) CLS-token classifier, central-frame initialiser, one head.
    dict(
        name="fe_token_central",
        model_name="vivit_classification",
        hidden_size=32,
        spatial=dict(num_heads=2, mlp_dim=64, num_layers=2),
        temporal=dict(num_heads=4, mlp_dim=96, num_layers=1),
        classifier="token",
        kernel_init_method="central_frame_initializer",
        representation_size=None,
        num_classes=5,
        checkpoint_layout="vivit_legacy",
        optimizer="momentum",
        write_bare_params=True,
        seed=0,
    ),
    # b) Global-average-pool classifier, average-frame initialiser, one head.
    dict(
        name="fe_gap_average",
        model_name="vivit_classification",
        hidden_size=48,
        spatial=dict(num_heads=4, mlp_dim=96, num_layers=2),
        temporal=dict(num_heads=2, mlp_dim=64, num_layers=2),
        classifier="gap",
        kernel_init_method="average_frame_initializer",
        representation_size=None,
        num_classes=7,
        checkpoint_layout="vivit_legacy",
        optimizer="sgd",  # empty param_states: keeps the fixture small
        write_bare_params=False,
        seed=1,
    ),
    # c) EPIC-KITCHENS style multi-head (noun + verb) model, CLS token.
    #    Scenic's ViViTMultiHeadClassificationModel has ONE output_projection of
    #    sum(class_splits) classes; logits are split with
    #    jnp.split(logits, np.cumsum(class_splits))[:-1]. EPIC uses
    #    class_splits=[300, 97], split_names=['noun', 'verb'] (noun first).
    dict(
        name="fe_token_multihead",
        model_name="vivit_multihead_classification",
        hidden_size=32,
        spatial=dict(num_heads=2, mlp_dim=64, num_layers=2),
        temporal=dict(num_heads=2, mlp_dim=64, num_layers=2),
        classifier="token",
        kernel_init_method="central_frame_initializer",
        representation_size=None,
        class_splits=[6, 4],
        split_names=["noun", "verb"],
        checkpoint_layout="vivit_legacy",
        optimizer="sgd",  # empty param_states: keeps the fixture small
        write_bare_params=False,
        seed=2,
    ),
    # d) Pre-logits layer (representation_size), default (lecun-normal) conv
    #    initialiser; checkpoint in the CURRENT scenic.train_lib layout
    #    (params at top-level `params`).
    dict(
        name="fe_token_prelogits",
        model_name="vivit_classification",
        hidden_size=32,
        spatial=dict(num_heads=4, mlp_dim=64, num_layers=2),
        temporal=dict(num_heads=2, mlp_dim=96, num_layers=1),
        classifier="token",
        kernel_init_method=None,
        representation_size=24,
        num_classes=5,
        checkpoint_layout="train_lib",
        optimizer="momentum",
        write_bare_params=False,
        seed=3,
    ),
]

PATCH_SIZE = 8  # spatial patch (fh = fw)
TUBELET_T = 2  # temporal extent of the tubelet (ft)


def scenic_config(cfg):
    """The ml_collections config Scenic's model classes read."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.model_name = cfg["model_name"]
    c.model_dtype_str = "float32"
    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = cfg["hidden_size"]
    c.model.patches = ml_collections.ConfigDict()
    # Scenic order: [fh, fw, ft]  (see embed_3d_patch: `fh, fw, ft = size`).
    c.model.patches.size = [PATCH_SIZE, PATCH_SIZE, TUBELET_T]
    c.model.attention_config = ml_collections.ConfigDict()
    c.model.attention_config.type = "factorized_encoder"
    c.model.spatial_transformer = ml_collections.ConfigDict(cfg["spatial"])
    c.model.temporal_transformer = ml_collections.ConfigDict(cfg["temporal"])
    c.model.representation_size = cfg["representation_size"]
    c.model.classifier = cfg["classifier"]
    # Non-zero rates on purpose: eval mode (train=False) must ignore them.
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    c.model.stochastic_droplayer_rate = 0.2
    c.model.temporal_encoding_config = ml_collections.ConfigDict()
    c.model.temporal_encoding_config.method = "3d_conv"
    c.model.temporal_encoding_config.kernel_init_method = cfg["kernel_init_method"]
    c.dataset_configs = ml_collections.ConfigDict()
    c.dataset_configs.num_frames = NUM_FRAMES
    if "class_splits" in cfg:
        c.dataset_configs.class_splits = cfg["class_splits"]
        c.dataset_configs.split_names = cfg["split_names"]
    return c


def num_classes_of(cfg):
    if "class_splits" in cfg:
        return int(sum(cfg["class_splits"]))
    return cfg["num_classes"]


# ---------------------------------------------------------------------------
# Parameter perturbation.
# ---------------------------------------------------------------------------


def perturb(params, rng: np.random.RandomState):
    """Moves every leaf away from its init, deterministically.

    Rules (path = '/'-joined keys):
      LayerNorm scale: 1 + 0.1 n      LayerNorm / any bias: += 0.1 n
      pos_embedding:   += 0.2 n       cls_* tokens:         += 1.0 n
      output_projection/kernel (zero-init): += n / sqrt(fan_in)
      other kernels:   += 0.02 n
    so zero-initialised heads, tokens and biases are all non-zero and position
    embeddings / CLS tokens visibly affect the logits.
    """
    import jax

    def leaf(path, x):
        keys = [p.key for p in path]
        name = "/".join(keys)
        x = np.asarray(x, dtype=np.float32)
        n = rng.standard_normal(x.shape).astype(np.float32)
        last = keys[-1]
        if last == "scale":
            return (1.0 + 0.1 * n).astype(np.float32)  # LayerNorm scale init is 1.
        if last == "bias":
            return x + 0.1 * n
        if last == "pos_embedding":
            return x + 0.2 * n
        if last.startswith("cls"):
            return x + 1.0 * n
        if keys[0] == "output_projection" and last == "kernel":
            return x + n / np.sqrt(x.shape[0])
        if last == "kernel":
            return x + 0.02 * n
        raise ValueError(f"unhandled parameter {name}")

    return jax.tree_util.tree_map_with_path(leaf, params)


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, p))
        else:
            out[p] = v
    return out


# ---------------------------------------------------------------------------
# Checkpoint layouts.
# ---------------------------------------------------------------------------


def legacy_vivit_state(params, rng, optimizer_name):
    """TrainState as scenic/projects/vivit/trainer.py writes it.

    The ViViT trainer uses scenic.train_lib_deprecated (flax.optim era):
      TrainState(global_step, optimizer, model_state, rng, accum_train_time)
    with optimizer = flax.optim.Optimizer(optimizer_def[static], state, target),
    state = OptimizerState(step, param_states) and, for config.optimizer =
    'momentum', param_states = tree of _MomentumParamState(momentum); for
    'sgd' (flax.optim.GradientDescent) every param_state is `()`, which
    serialises as an empty map.
    flax.optim no longer exists, so the struct dataclasses are mirrored here
    (same field names and order) and serialised with flax.serialization, which
    is exactly what flax.training.checkpoints.save_checkpoint (legacy, non-orbax
    path) does: msgpack of to_state_dict(train_state).
    """
    import jax
    from flax import struct

    @struct.dataclass
    class _MomentumParamState:
        momentum: Any

    @struct.dataclass
    class OptimizerState:
        step: Any
        param_states: Any

    class Optimizer(struct.PyTreeNode):
        optimizer_def: Any = struct.field(pytree_node=False)
        state: Any = struct.field(pytree_node=True)
        target: Any = struct.field(pytree_node=True)

    @struct.dataclass
    class TrainState:  # scenic/train_lib_deprecated/train_utils.py
        global_step: Any = 0
        optimizer: Any = None
        model_state: Any = None
        rng: Any = None
        accum_train_time: Any = 0

    if optimizer_name == "momentum":
        param_states = jax.tree_util.tree_map(
            lambda p: _MomentumParamState((0.01 * rng.standard_normal(p.shape)).astype(np.float32)), params
        )
    elif optimizer_name == "sgd":
        param_states = jax.tree_util.tree_map(lambda p: (), params)
    else:
        raise ValueError(optimizer_name)
    optimizer = Optimizer(
        optimizer_def=None,
        state=OptimizerState(step=np.asarray(1234, np.int32), param_states=param_states),
        target=params,
    )
    return TrainState(
        global_step=np.asarray(1234, np.int32),  # pmapped step+1 -> int32 array
        optimizer=optimizer,
        model_state={},  # ViViT has no batch-stats collections.
        rng=np.asarray([0, 42], np.uint32),
        accum_train_time=0,
    )


def train_lib_state(params, rng):
    """TrainState as the current scenic/train_lib/train_utils.py defines it.

    TrainState(tx[static], opt_state, params, global_step, model_state, rng,
    metadata); classification_trainer.py sets metadata={'chrono': chrono.save()}.
    opt_state here is optax.sgd(momentum=0.9) state (representative).
    """
    import jax
    import optax
    from flax import struct

    @struct.dataclass
    class TrainState:
        tx: Any = struct.field(default=None, pytree_node=False)
        opt_state: Any = None
        params: Any = struct.field(default_factory=dict)
        global_step: Any = 0
        model_state: Any = struct.field(default_factory=dict)
        rng: Any = None
        metadata: Any = None

    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    opt_state = jax.tree_util.tree_map(
        lambda p: (0.01 * rng.standard_normal(np.shape(p))).astype(np.float32), opt_state
    )
    return TrainState(
        tx=tx,
        opt_state=opt_state,
        params=params,
        global_step=np.asarray(1234, np.int32),
        model_state={},
        rng=np.asarray([0, 42], np.uint32),
        metadata={
            "chrono": dict(accum_program_time=1.0, accum_train_time=1.0, accum_pause_time=0.0, accum_examples_seen=2468)
        },
    )


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def run_config(cfg, out_dir, vm, scenic_commit):
    import flax
    import jax
    import jax.numpy as jnp

    config = scenic_config(cfg)
    num_classes = num_classes_of(cfg)
    meta = {"num_classes": num_classes, "target_is_onehot": True}
    if "class_splits" in cfg:
        meta["class_splits"] = cfg["class_splits"]
    model_cls = vm.get_model_cls(cfg["model_name"])
    model = model_cls(config, meta)
    flax_model = model.flax_model
    assert type(flax_model).__name__ == "SpaceTimeViViT", type(flax_model)

    shape = (BATCH, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)
    variables = flax_model.init(jax.random.PRNGKey(cfg["seed"]), jnp.zeros(shape, jnp.float32), train=False)
    variables = flax.core.unfreeze(variables)
    assert set(variables) == {"params"}, set(variables)
    nrng = np.random.RandomState(1000 + cfg["seed"])
    params = perturb(variables["params"], nrng)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)

    # 8-bit-valued video (like decoded frames), mapped to roughly [-2, 2]:
    # realistic, and it keeps the compressed .npz small.
    pixels = np.random.RandomState(2000 + cfg["seed"]).randint(0, 256, size=shape)
    video = ((pixels.astype(np.float32) - 127.5) / 64.0).astype(np.float32)

    # Eval-mode forward (train=False -> all Dropout deterministic and the
    # stochastic-depth drop pattern is 0.0). Capture the intermediates that live
    # OUTSIDE Scenic's jax.vmap over time (values captured inside it are not
    # meaningful).
    outside_vmap = ("embedding", "TemporalTransformer", "pre_logits")

    def capture(mdl, method_name):
        del method_name
        return mdl.name in outside_vmap

    logits, state = flax_model.apply(
        {"params": params}, jnp.asarray(video), train=False, capture_intermediates=capture, mutable=["intermediates"]
    )
    logits = np.asarray(logits, np.float32)
    inter = state["intermediates"]
    embedding = np.asarray(inter["embedding"]["__call__"][0], np.float32)
    temporal_encoded = np.asarray(inter["TemporalTransformer"]["__call__"][0], np.float32)
    pre_logits = np.asarray(inter["pre_logits"]["__call__"][0], np.float32)

    # Spatial encoder output per tubelet, recomputed with Scenic's own Encoder
    # applied per time index (the model vmaps the same computation).
    b, t, gh, gw, d = embedding.shape
    tokens = embedding.reshape(b, t, gh * gw, d)
    sp_cfg = cfg["spatial"]
    spatial_encoder = vm.Encoder(
        temporal_dims=None,
        mlp_dim=sp_cfg["mlp_dim"],
        num_layers=sp_cfg["num_layers"],
        num_heads=sp_cfg["num_heads"],
        attention_config=config.model.attention_config,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        stochastic_droplayer_rate=0.2,
    )
    spatial_out = []
    for ti in range(t):
        x = tokens[:, ti]
        if cfg["classifier"] == "token":
            cls = np.tile(params["cls_SpatialTransformer"], [b, 1, 1])
            x = np.concatenate([cls, x], axis=1)
        y = spatial_encoder.apply({"params": params["SpatialTransformer"]}, jnp.asarray(x), train=False)
        y = y[:, 0] if cfg["classifier"] == "token" else jnp.mean(y, axis=1)
        spatial_out.append(np.asarray(y, np.float32))
    spatial_out = np.stack(spatial_out, axis=1)  # (B, T', D)

    # Self-check: temporal encoder on spatial_out reproduces the captured value.
    tp_cfg = cfg["temporal"]
    temporal_encoder = vm.Encoder(
        temporal_dims=None,
        mlp_dim=tp_cfg["mlp_dim"],
        num_layers=tp_cfg["num_layers"],
        num_heads=tp_cfg["num_heads"],
        attention_config=config.model.attention_config,
    )
    x = spatial_out
    if cfg["classifier"] == "token":
        x = np.concatenate([np.tile(params["cls_TemporalTransformer"], [b, 1, 1]), x], axis=1)
    check = np.asarray(temporal_encoder.apply({"params": params["TemporalTransformer"]}, jnp.asarray(x), train=False))
    err = float(np.max(np.abs(check - temporal_encoded)))
    assert err < 1e-5, f"spatial_out self-check failed: {err}"

    # Train-mode sanity: dropout really is configured (eval must differ).
    train_logits = np.asarray(
        flax_model.apply({"params": params}, jnp.asarray(video), train=True, rngs={"dropout": jax.random.PRNGKey(7)})
    )
    assert np.max(np.abs(train_logits - logits)) > 1e-4

    desc = dict(
        name=cfg["name"],
        scenic_commit=scenic_commit,
        scenic_model_class=type(model).__name__,
        scenic_flax_module="SpaceTimeViViT",
        model_name=cfg["model_name"],
        attention_type="factorized_encoder",
        hidden_size=cfg["hidden_size"],
        spatial_num_heads=sp_cfg["num_heads"],
        spatial_num_layers=sp_cfg["num_layers"],
        spatial_mlp_dim=sp_cfg["mlp_dim"],
        temporal_num_heads=tp_cfg["num_heads"],
        temporal_num_layers=tp_cfg["num_layers"],
        temporal_mlp_dim=tp_cfg["mlp_dim"],
        patch_size=PATCH_SIZE,
        tubelet_t=TUBELET_T,
        scenic_patches_size=[PATCH_SIZE, PATCH_SIZE, TUBELET_T],
        num_frames=NUM_FRAMES,
        image_size=IMAGE_SIZE,
        classifier=cfg["classifier"],
        num_classes=num_classes,
        class_splits=cfg.get("class_splits"),
        split_names=cfg.get("split_names"),
        representation_size=cfg["representation_size"],
        kernel_init_method=cfg["kernel_init_method"],
        temporal_encoding_method="3d_conv",
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        stochastic_droplayer_rate=0.2,
        checkpoint_layout=cfg["checkpoint_layout"],
        checkpoint_optimizer=cfg["optimizer"],
        bare_params_file=(cfg["name"] + ".params.msgpack" if cfg["write_bare_params"] else None),
        params_prefix=("optimizer/target" if cfg["checkpoint_layout"] == "vivit_legacy" else "params"),
        input_layout="B,T,H,W,C float32 (channels-last)",
        input_values="(uint8 - 127.5) / 64",
        scenic_model_config=config.model.to_dict(),
    )

    arrays = dict(
        input=video,
        logits=logits,
        embedding=embedding,  # conv output (B, T', H/p, W/p, D)
        spatial_out=spatial_out,  # per-tubelet spatial feature (B, T', D)
        temporal_encoded=temporal_encoded,  # temporal encoder out, post-LN
        pre_logits=pre_logits,  # (B, D) or (B, representation_size)
        config=np.asarray(json.dumps(desc, sort_keys=True)),
    )
    if "class_splits" in cfg:
        splits = np.split(logits, np.cumsum(cfg["class_splits"]), axis=-1)[:-1]
        for sname, part in zip(cfg["split_names"], splits):
            arrays[f"logits_{sname}"] = part.astype(np.float32)

    np.savez_compressed(os.path.join(out_dir, cfg["name"] + ".npz"), **arrays)

    srng = np.random.RandomState(3000 + cfg["seed"])
    if cfg["checkpoint_layout"] == "vivit_legacy":
        train_state = legacy_vivit_state(params, srng, cfg["optimizer"])
    else:
        train_state = train_lib_state(params, srng)
    blob = flax.serialization.to_bytes(train_state)
    with open(os.path.join(out_dir, cfg["name"] + ".msgpack"), "wb") as f:
        f.write(blob)
    # Round-trip check: the bytes restore to the same parameters.
    restored = flax.serialization.msgpack_restore(blob)
    if cfg["checkpoint_layout"] == "vivit_legacy":
        rparams = restored["optimizer"]["target"]
    else:
        rparams = restored["params"]
    fa, fb = flatten(rparams), flatten(params)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])

    if cfg["write_bare_params"]:
        with open(os.path.join(out_dir, cfg["name"] + ".params.msgpack"), "wb") as f:
            f.write(flax.serialization.to_bytes(params))

    return desc, flatten(restored), logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenic",
        required=True,
        help="path to a google-research/scenic checkout (the directory that contains scenic/)",
    )
    parser.add_argument(
        "--commit",
        default=None,
        help="Scenic commit hash to record (default: "
        "<scenic>/.scenic_commit, else `git rev-parse "
        'HEAD` in <scenic>, else "unknown")',
    )
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--tree", default=None, help="optional path to write the flattened trees to")
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.abspath(args.scenic))
    _install_stand_ins()

    import flax
    import jax
    from scenic.projects.vivit import model as vm

    commit = args.commit
    marker = os.path.join(args.scenic, ".scenic_commit")
    if commit is None and os.path.exists(marker):
        with open(marker) as f:
            commit = f.read().strip()
    if commit is None:
        import subprocess

        try:
            commit = subprocess.run(
                ["git", "-C", args.scenic, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    commit = commit or "unknown"

    print(f"scenic {commit}  jax {jax.__version__}  flax {flax.__version__}  numpy {np.__version__}")
    lines = []
    for cfg in CONFIGS:
        desc, flat, logits = run_config(cfg, args.out, vm, commit)
        print(f"{cfg['name']}: logits {logits.shape} range [{logits.min():.3f}, {logits.max():.3f}]")
        lines.append(f"== {cfg['name']} ({desc['checkpoint_layout']})")
        for k in sorted(flat):
            v = flat[k]
            shp = tuple(np.shape(v))
            dt = getattr(v, "dtype", type(v).__name__)
            lines.append(f"{k} {shp} {dt}")
    if args.tree:
        with open(args.tree, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
