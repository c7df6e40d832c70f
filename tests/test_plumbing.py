"""Sharding (sharded == unsharded on 8 CPU devices) and training plumbing:
optimiser, schedule, logging, atomic resumable checkpoints, NaN guard."""
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import sharding_check  # noqa: E402


# ---- 7. Sharding ----


def test_sharded_equals_unsharded(tmp_path):
    # The reference runs on CPU even where a GPU exists: the subprocess is CPU-only
    # and GPU matmuls may use TF32.
    with jax.default_device(jax.devices("cpu")[0]):
        ref, _ = sharding_check.run("mlp", mesh=None)
    got, specs = sharding_check.run_in_subprocess("mlp", str(tmp_path), devices=8, fsdp=4)
    assert specs["mesh"] == {"data": 2, "fsdp": 4}
    assert specs["default_mesh"] == {"data": 1, "fsdp": 8}  # fsdp=0: all of one host's devices
    assert "--fsdp 3 must divide the number of devices (8)" in specs["fsdp_error"]
    assert ref.keys() == got.keys() and len(ref) > 10
    for k in ref:  # loss, outputs, gradients of both steps, final parameters
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert not np.allclose(ref["params/l1/kernel/value"], sharding_check.MLP(nnx.Rngs(0)).l1.kernel[...])

    # Everything, optimiser state included, lives on the 8-device mesh ...
    bad = {k: v for k, v in specs.items() if isinstance(v, str) and not k.endswith("_error")}
    assert not bad, bad
    # ... split on the largest dimension divisible by fsdp=4, replicated otherwise,
    assert specs["params/l1/kernel/value"] == [None, "fsdp"]
    assert specs["params/l2/kernel/value"] == ["fsdp", None]
    assert specs["params/l2/bias/value"] == [None]
    assert specs["params/drop/rngs/key/value"] == []
    assert specs["opt/opt_state/1/0/v_row/l1/kernel/value"] == ["fsdp"]  # Adafactor's factored stats
    # ... and stays split after the jitted train steps.
    for k in ["l1/kernel", "l2/kernel", "l1/bias"]:
        assert specs[f"after/{k}/value"] == specs[f"params/{k}/value"], k
    assert "batch size 12 is not divisible by the number of devices (8)" in specs["batch_error"]
    assert "--batch-size" in specs["batch_error"]


def test_t5_sharded_equals_unsharded(tmp_path):
    """The issue's check: a T5 train step on 8 devices == on 1 (logits, loss, grads, params)."""
    with jax.default_device(jax.devices("cpu")[0]):
        ref, _ = sharding_check.run("t5", mesh=None)
    got, specs = sharding_check.run_in_subprocess("t5", str(tmp_path), devices=8, fsdp=4)
    assert ref.keys() == got.keys() and len(ref) > 40
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert specs["params/shared/value"] == [None, "fsdp"] or specs["params/shared/value"] == ["fsdp", None]
    assert "fsdp" in specs["params/encoder/0/wi/value"]


def test_make_mesh_and_bad_fsdp():
    n = jax.device_count()
    mesh = C.make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.size == n
    with pytest.raises(SystemExit, match=f"--fsdp {n + 1} must divide the number of devices"):
        C.make_mesh(n + 1)


def test_shard_batch_single_device_keeps_values():
    mesh = C.make_mesh()
    x = np.arange(4.0 * jax.device_count()).reshape(-1, 1)
    out = C.shard_batch({"x": x}, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(out), x)
    assert out.sharding == C.batch_sharding(mesh)


# ---- 8. Optimiser ----


def _descend(tx, steps=60):
    rng = np.random.default_rng(0)
    target = {"w": jnp.asarray(rng.normal(size=(128, 130)), jnp.float32),  # factored by Adafactor
              "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    params = jax.tree.map(jnp.ones_like, target)
    loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    first = loss(params)
    for _ in range(steps):
        params, state = step(params, state)
    return float(first), float(loss(params))


@pytest.mark.parametrize("name,lr", [("adafactor", 0.05), ("adamw", 0.05)])
def test_optimizers_reduce_a_quadratic(name, lr):
    first, last = _descend(C.make_optimizer(name, lr=lr))
    assert last < 0.3 * first, (first, last)


def test_adafactor_is_t5x_decay_08():
    """Two steps by hand (Shazeer & Stern 2018, Alg. 4 unfactored, as in T5X):
    beta2_t = 1 - t^-0.8, u = g / sqrt(v), u /= max(1, RMS(u)), step = lr * max(RMS(p), 1e-3) * u."""
    lr, p0 = 0.1, np.array([0.5, -2.0, 3.0], np.float32)
    g1, g2 = np.array([1.0, -2.0, 0.5], np.float32), np.array([0.3, 4.0, -1.0], np.float32)
    tx = C.make_optimizer("adafactor", lr=lr, max_grad_norm=0)
    state = tx.init(jnp.asarray(p0))
    params = jnp.asarray(p0)
    for g in (g1, g2):
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)

    rms = lambda x: np.sqrt(np.mean(x ** 2))
    v, p = np.zeros(3), p0.astype(np.float64)
    for t, g in enumerate((g1, g2), start=1):
        beta = 1 - t ** -0.8
        v = beta * v + (1 - beta) * (g.astype(np.float64) ** 2 + 1e-30)
        u = g / np.sqrt(v)
        u = u / max(1.0, rms(u))
        p = p - lr * max(rms(p), 1e-3) * u
    np.testing.assert_allclose(np.asarray(params), p, rtol=1e-5)


def test_schedule_warmup_then_constant_or_cosine():
    s = C.make_schedule(2.0, warmup_steps=10)
    assert [float(s(t)) for t in (0, 5, 10, 1000)] == [0.0, 1.0, 2.0, 2.0]
    assert float(C.make_schedule(2.0)(0)) == 2.0
    c = C.make_schedule(2.0, warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([float(c(t)) for t in (5, 10, 60, 110)], [1.0, 2.0, 1.0, 0.0], atol=1e-6)


def test_optimizer_uses_the_warmup():
    tx = C.make_optimizer("adamw", lr=0.1, warmup_steps=4)
    params = jnp.ones(3)
    state = tx.init(params)
    u0, state = tx.update(jnp.ones(3), state, params)
    u1, state = tx.update(jnp.ones(3), state, params)
    assert np.all(np.asarray(u0) == 0) and np.all(np.asarray(u1) < 0)


def test_unknown_optimizer():
    with pytest.raises(SystemExit, match="unknown optimizer 'sgd'; choose one of: adafactor, adamw"):
        C.make_optimizer("sgd")


# ---- 8. Logging ----


def test_logger_writes_jsonl_tensorboard_config(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    log = C.Logger(run_dir, {"lr": 1e-4, "model": "t5-small"})
    values = log.log({"loss/dpo": jnp.array(0.25), "eval/win_rate": 0.75}, step=3)
    log.log({"loss/dpo": np.float32(0.125)}, step=4)
    log.close()
    assert values == {"loss/dpo": 0.25, "eval/win_rate": 0.75}
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows == [{"step": 3, "loss/dpo": 0.25, "eval/win_rate": 0.75}, {"step": 4, "loss/dpo": 0.125}]
    assert json.load(open(os.path.join(run_dir, "config.json"))) == {"lr": 1e-4, "model": "t5-small"}
    events = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 100  # header + 3 scalars
    assert "step 3  loss/dpo 0.25  eval/win_rate 0.75" in capsys.readouterr().out


def test_logger_track_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(SystemExit, match="pip install wandb"):
        C.Logger(str(tmp_path), {}, track=True)


def test_progress_is_quiet_in_tests(capsys):
    assert list(C.progress(3, desc="train")) == [0, 1, 2]
    assert list(C.progress(["a", "b"])) == ["a", "b"]
    assert capsys.readouterr().err == ""


# ---- 8. Checkpoints ----


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.l1(x))))


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


@nnx.jit
def _train_step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(_loss)(model, x)
    optimizer.update(model, grads)
    return loss


_TX = C.make_optimizer("adafactor", lr=1e-2)  # one object: nnx.jit treats tx as static (a new one recompiles)


def _setup(seed):
    model = Tiny(nnx.Rngs(seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, _TX, wrt=nnx.Param)


def _state(model, optimizer, key):
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "key": key, "epoch": 2, "temp": 0.5}


def _bits(tree):  # compare bit patterns: exact, and works for bf16 and PRNG keys
    def one(x):
        x = jax.random.key_data(x) if C._is_prng_key(x) else x
        x = np.asarray(x)
        return x.view(f"u{x.dtype.itemsize}") if x.dtype.kind in "fV" else x
    return [one(x) for x in jax.tree.leaves(tree)]


def test_checkpoint_round_trip_bit_exact_bf16(tmp_path):
    model, opt = _setup(0)
    _train_step(model, opt, jnp.ones((2, 4)))  # non-trivial optimiser state
    saved = _state(model, opt, jax.random.key(7))
    saved["bf16"] = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param))
    assert C.save_checkpoint(str(tmp_path), saved, step=11, extra={"data_pos": 42}).endswith("checkpoint.npz")

    model2, opt2 = _setup(5)  # different values, same structure
    target = _state(model2, opt2, jax.random.key(0))
    target["bf16"] = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model2, nnx.Param))
    target["epoch"], target["temp"] = 0, 0.0
    state, step, extra = C.restore_checkpoint(str(tmp_path), target)
    assert (step, extra) == (11, {"data_pos": 42})
    assert state["bf16"]["l1"]["kernel"][...].dtype == jnp.bfloat16
    assert state["epoch"] == 2 and state["temp"] == 0.5
    assert jax.tree.structure(state) == jax.tree.structure(saved)
    for a, b in zip(_bits(state), _bits(saved)):
        np.testing.assert_array_equal(a, b)
    nnx.update(model2, state["model"])
    nnx.update(opt2, state["optimizer"])
    for a, b in zip(_bits(_state(model2, opt2, state["key"])), _bits(_state(model, opt, saved["key"]))):
        np.testing.assert_array_equal(a, b)
    assert C.checkpoint_step(str(tmp_path)) == 11


def test_no_checkpoint_returns_none(tmp_path):
    model, opt = _setup(0)
    assert C.restore_checkpoint(str(tmp_path / "missing"), _state(model, opt, jax.random.key(0))) is None
    assert C.checkpoint_step(str(tmp_path)) is None


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _setup(0)
    key = jax.random.key(1)
    C.save_checkpoint(str(tmp_path), _state(model, opt, key), step=1)
    before = _bits(_state(model, opt, key))
    _train_step(model, opt, jnp.ones((2, 4)))

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(str(tmp_path), _state(model, opt, key), step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # the temp file is gone too
    (tmp_path / ".checkpoint.npz.tmp999").write_bytes(b"half a file")  # as if killed mid-write
    state, step, _ = C.restore_checkpoint(str(tmp_path), _state(model, opt, key))
    assert step == 1
    for a, b in zip(_bits(state), before):
        np.testing.assert_array_equal(a, b)
    C.save_checkpoint(str(tmp_path), _state(model, opt, key), step=2)
    assert os.listdir(tmp_path) == ["checkpoint.npz"] and C.checkpoint_step(str(tmp_path)) == 2


def test_restore_into_mismatched_target_names_the_leaf(tmp_path):
    model, opt = _setup(0)
    C.save_checkpoint(str(tmp_path), {"model": nnx.state(model)}, step=1)
    other = nnx.state(model)
    other["l2"]["bias"] = nnx.Param(jnp.zeros(6))
    with pytest.raises(SystemExit, match=r"leaf 'model/l2/bias/value' is float32\[5\] there but float32\[6\]"):
        C.restore_checkpoint(str(tmp_path), {"model": other})
    with pytest.raises(SystemExit, match="has no leaf 'step'"):
        C.restore_checkpoint(str(tmp_path), {"model": nnx.state(model), "step": 0})
    with pytest.raises(SystemExit, match="has a leaf 'model/l2/bias/value' that the model/optimizer lacks"):
        C.restore_checkpoint(str(tmp_path), {"model": {k: nnx.state(model)[k] for k in ("drop", "l1")}})
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, nnx.state(model))
    with pytest.raises(SystemExit, match="is float32.* there but bfloat16"):
        C.restore_checkpoint(str(tmp_path), {"model": bf16})


def test_resume_equals_training_straight_through(tmp_path):
    """k steps + save + restore into fresh objects + k steps == 2k steps (dropout on)."""
    xs = [jnp.asarray(np.random.default_rng(i).normal(size=(2, 4)), jnp.float32) for i in range(6)]
    model, opt = _setup(0)
    for x in xs:
        _train_step(model, opt, x)

    model_a, opt_a = _setup(0)
    for x in xs[:3]:
        _train_step(model_a, opt_a, x)
    C.save_checkpoint(str(tmp_path), {"model": nnx.state(model_a), "optimizer": nnx.state(opt_a)}, step=3)
    model_b, opt_b = _setup(123)  # a fresh process would start from other values
    target = {"model": nnx.state(model_b), "optimizer": nnx.state(opt_b)}
    state, step, _ = C.restore_checkpoint(str(tmp_path), target)
    nnx.update(model_b, state["model"])
    nnx.update(opt_b, state["optimizer"])
    for x in xs[step:]:
        _train_step(model_b, opt_b, x)
    assert int(opt_b.step[...]) == 6
    for a, b in zip(_bits(nnx.state(model_b)), _bits(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


def test_check_finite(tmp_path):
    C.check_finite({"loss/dpo": jnp.array(0.3)}, step=1, ckpt_dir=str(tmp_path))  # fine: no error
    with pytest.raises(SystemExit, match="loss/dpo became NaN/inf at step 9; no checkpoint was saved yet"):
        C.check_finite({"loss/dpo": jnp.array(jnp.nan), "eval/kl": 1.0}, step=9, ckpt_dir=str(tmp_path))
    C.save_checkpoint(str(tmp_path), {"w": jnp.ones(2)}, step=7)
    msg = f"loss/dpo became NaN/inf at step 9; the last good checkpoint is at {tmp_path}/checkpoint.npz"
    with pytest.raises(SystemExit, match=msg + r" \(step 7\)$"):
        C.check_finite({"loss/dpo": float("inf")}, step=9, ckpt_dir=str(tmp_path))
