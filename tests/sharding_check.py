"""Sharded == unsharded, for any nnx model: a forward pass and a few train steps.

The sharded run needs several devices, and 8 CPU devices exist only if
XLA_FLAGS is set before jax is imported, so it runs in a subprocess
(`python tests/sharding_check.py CASE OUT_DIR FSDP`) while the reference runs
in the test process. To cover another model, add an entry to CASES:
    CASES["t5"] = (lambda rngs: C.T5(...), t5_loss, make_t5_batch)
with loss_fn(model, batch) -> (scalar loss, outputs) and make_batch() -> dict
of numpy arrays with a batch dimension divisible by 8.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common as C  # noqa: E402


class MLP(nnx.Module):
    """Shapes chosen to hit each sharding rule with fsdp=4: l1.kernel (128, 256) is
    factored by Adafactor and split on 256; l2.kernel (256, 5) split on 256;
    l2.bias (5,) and norm (5,) replicated. Dropout checks that random masks do
    not depend on the sharding."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(128, 256, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(256, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.l2(self.drop(jax.nn.relu(self.l1(x)))))


def mlp_loss(model, batch):
    out = model(batch["x"])
    return ((out - batch["y"]) ** 2).mean(), out


def mlp_batch():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(16, 128)).astype(np.float32),
            "y": rng.normal(size=(16, 5)).astype(np.float32)}


def tiny_t5(rngs):
    """A tiny Flan-style T5 (gated-gelu, untied) with shapes divisible by fsdp=4."""
    from transformers import T5Config

    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return C.T5(C.replace(C.T5Spec.from_config(cfg), tied=False), rngs=rngs)


def t5_loss(model, batch):
    """A DPO-shaped step: sequence log-probs of chosen and rejected, a logistic loss."""
    x, xm = batch["x"], batch["xm"]
    lw = C.sequence_logps(model, x, xm, batch["yw"], batch["ym"])
    ll = C.sequence_logps(model, x, xm, batch["yl"], batch["ym"])
    return -jax.nn.log_sigmoid(0.1 * (lw - ll)).mean(), model(x, xm, C.shift_right(batch["yw"], 0))


def t5_batch():
    rng = np.random.default_rng(0)
    x = rng.integers(3, 64, (8, 12)).astype(np.int32)
    xm = (np.arange(12)[None] < rng.integers(4, 13, (8, 1))).astype(np.int32)  # padded prompts
    ym = (np.arange(6)[None] < rng.integers(2, 7, (8, 1))).astype(np.int32)
    return {"x": x * xm, "xm": xm, "yw": rng.integers(3, 64, (8, 6)).astype(np.int32) * ym,
            "yl": rng.integers(3, 64, (8, 6)).astype(np.int32) * ym, "ym": ym}


CASES = {"mlp": (lambda rngs: MLP(rngs), mlp_loss, mlp_batch), "t5": (tiny_t5, t5_loss, t5_batch)}


def _named(tree, prefix):
    names, leaves, _ = C._named_leaves(tree)
    return {f"{prefix}/{n}": x for n, x in zip(names, leaves)}


def run(case: str, mesh=None, steps: int = 2):
    """Forward + `steps` Adafactor steps. Returns (numpy results, sharding specs)."""
    factory, loss_fn, make_batch = CASES[case]
    model = factory(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, C.make_optimizer("adafactor", lr=1e-2), wrt=nnx.Param)
    batch = make_batch()
    if mesh is not None:
        C.shard_model(model, mesh)
        C.shard_model(optimizer, mesh)
        batch = C.shard_batch(batch, mesh)

    @nnx.jit
    def train_step(model, optimizer, batch):
        (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        optimizer.update(model, grads)
        return loss, out, grads

    specs = {k: _spec(x) for k, x in {**_named(nnx.state(model), "params"),
                                      **_named(nnx.state(optimizer), "opt")}.items()}
    results = {}
    for i in range(steps):
        loss, out, grads = train_step(model, optimizer, batch)
        results.update({f"{i}/loss": loss, f"{i}/outputs": out, **_named(grads, f"{i}/grads")})
    results.update(_named(nnx.state(model, nnx.Param), "params"))
    specs.update({k: _spec(x) for k, x in _named(nnx.state(model), "after").items()})
    return {k: np.asarray(v) for k, v in results.items()}, specs


def _spec(x):
    """Partition spec padded to one entry per dimension, or a string if not on a mesh."""
    s = x.sharding
    if not isinstance(s, jax.sharding.NamedSharding):
        return f"not on the mesh: {s}"
    return list(s.spec) + [None] * (x.ndim - len(s.spec))


def run_in_subprocess(case: str, out_dir: str, devices: int = 8, fsdp: int = 4):
    """Run `case` sharded on `devices` CPU devices in a fresh interpreter."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, out_dir, str(fsdp)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(os.path.join(out_dir, "results.npz")) as z:
        results = dict(z)
    with open(os.path.join(out_dir, "specs.json")) as f:
        return results, json.load(f)


if __name__ == "__main__":
    case, out_dir, fsdp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mesh = C.make_mesh(fsdp)
    results, specs = run(case, mesh)
    specs["mesh"] = dict(mesh.shape)
    specs["default_mesh"] = dict(C.make_mesh().shape)
    for key, bad in [("batch_error", lambda: C.shard_batch({"x": np.zeros((12, 3))}, mesh)),
                     ("fsdp_error", lambda: C.make_mesh(3))]:  # errors a user sees on 8 devices
        try:
            bad()
        except SystemExit as e:
            specs[key] = str(e)
    np.savez(os.path.join(out_dir, "results.npz"), **results)
    with open(os.path.join(out_dir, "specs.json"), "w") as f:
        json.dump(specs, f, indent=1)
