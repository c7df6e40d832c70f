"""Sections 7 (sharding) and 8 (training plumbing) of common.py, written apart until merge."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from common import fail


# ---- 7. Sharding ----
# One recipe for 1 CPU, 8 GPUs or a TPU slice: a 2-D mesh ("data", "fsdp").
# Parameters and optimiser state are split along "fsdp" (FSDP / ZeRO-3: XLA
# all-gathers them where they are used); batches are split along both axes, so
# every device sees a different slice of the batch. With Auto axes XLA's GSPMD
# propagates shardings through the unchanged model code: no annotations needed.


def init_distributed(enabled: bool) -> None:
    """Join a multi-host job (TPU pod, multi-node GPU). Call before any other JAX call.

    The coordinator address and process ids come from the environment (TPU
    metadata, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    """
    if enabled:
        jax.distributed.initialize()


def make_mesh(fsdp: int = 0) -> Mesh:
    """Mesh over all devices with axes ("data", "fsdp"); `fsdp` devices per parameter shard.

    fsdp=0 means one host's devices (all devices on a single host): parameters are
    then split within a host over fast links and replicated across hosts.
    """
    n = jax.device_count()
    fsdp = fsdp or jax.local_device_count()
    if fsdp < 0 or n % fsdp:
        fail(f"--fsdp {fsdp} must divide the number of devices ({n}); use a divisor of {n} or 0")
    # Auto (not Explicit, jax's default) so that jit propagates shardings itself.
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def param_sharding(x, mesh: Mesh) -> NamedSharding:
    """Split the largest dimension divisible by the fsdp size; replicate if none is."""
    n = mesh.shape["fsdp"]
    dims = [d for d in range(x.ndim) if n > 1 and x.shape[d] % n == 0]
    spec = [None] * x.ndim
    if dims:
        spec[max(dims, key=lambda d: x.shape[d])] = "fsdp"  # first of equal sizes
    return NamedSharding(mesh, P(*spec))


def shard_model(module, mesh: Mesh):
    """Place every array of an nnx object (a model, or an nnx.Optimizer) on the mesh.

    Call it on the optimizer too, after creating it from the sharded model:
    optax's Adafactor creates its factored statistics (and step counts) unsharded.
    """
    state = nnx.state(module)
    put = lambda x: jax.device_put(x, param_sharding(x, mesh)) if isinstance(x, jax.Array) else x
    nnx.update(module, jax.tree.map(put, state))
    return module


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices: ("data", "fsdp") jointly."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def shard_batch(batch, mesh: Mesh, flag: str = "--batch-size"):
    """Put a pytree of [B, ...] arrays on the mesh, split along B.

    Numpy inputs are the *global* batch, identical on every process (all hosts
    load the same data with the same seed); each process keeps only its rows.
    `flag` names the command-line flag to change when B does not fit.
    """
    n, sharding = mesh.size, batch_sharding(mesh)

    def put(x):
        if np.ndim(x) == 0:  # a scalar riding along with the batch
            return jax.device_put(x, NamedSharding(mesh, P()))
        if x.shape[0] % n:
            fail(f"batch size {x.shape[0]} is not divisible by the number of devices ({n}); "
                 f"set {flag} to a multiple of {n}")
        if isinstance(x, jax.Array):  # already a global array (e.g. sampled on device)
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)


# ---- 8. Training ----


def make_schedule(lr: float, warmup_steps: int = 0, total_steps: int | None = None) -> optax.Schedule:
    """lr * step / warmup_steps during warm-up, then constant lr (the papers' choice),
    or, when total_steps is given, cosine decay from lr to 0 at total_steps."""
    after = (optax.constant_schedule(lr) if total_steps is None
             else optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1)))
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(name: str = "adafactor", lr: float = 1e-4, warmup_steps: int = 0,
                   total_steps: int | None = None, decay_rate: float = 0.8,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """Adafactor as the papers use it (T5X's, second-moment decay 0.8), or AdamW.

    Adafactor: "Adafactor with decay rate 0.8" in Calandriello et al. 2024,
    Tang et al. 2024 and Richemond et al. 2024 is T5X's Adafactor with its
    defaults (Shazeer & Stern 2018): beta2_t = 1 - t^-0.8, factored second
    moments for matrices with two dims >= 128, update clipping at RMS 1, no
    momentum, and the step scaled by the parameter's RMS (so lr is a *relative*
    step size; HF's relative_step lr schedule is NOT used, the lr is fixed/ours).
    weight_decay is then an absolute per-step fraction; for AdamW it is scaled by lr.
    max_grad_norm > 0 clips the global gradient norm first (0 disables).
    """
    schedule = make_schedule(lr, warmup_steps, total_steps)
    if name == "adafactor":
        tx = optax.adafactor(learning_rate=schedule, decay_rate=decay_rate,
                             multiply_by_parameter_scale=True, clipping_threshold=1.0,
                             weight_decay_rate=weight_decay or None)
    elif name == "adamw":
        tx = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        fail(f"unknown optimizer {name!r}; choose one of: adafactor, adamw")
    if max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx


def progress(iterable_or_total, desc: str | None = None, **kwargs):
    """tqdm on stderr; silent when stderr is not a terminal (logs, CI, tests) and off process 0."""
    it = range(iterable_or_total) if isinstance(iterable_or_total, int) else iterable_or_total
    return tqdm(it, desc=desc, disable=None if jax.process_index() == 0 else True,
                dynamic_ncols=True, **kwargs)


def _summary_writer(run_dir: str):
    # tensorboardX imports PyTorch, when installed, only to recognise torch
    # tensors (3 s per process); we log floats, so hide torch during the import.
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter(run_dir)


class Logger:
    """Metrics to stdout, TensorBoard and run_dir/metrics.jsonl (+ W&B with track=True).

    Only process 0 writes. Names are namespaced: "loss/...", "eval/win_rate", "perf/...".
    After a resume, steps logged between the checkpoint and the crash appear twice
    in metrics.jsonl; the later line wins.
    """

    def __init__(self, run_dir: str, config, track: bool = False,
                 project: str = "jax-preference", run_name: str | None = None):
        self.active = jax.process_index() == 0
        self.wandb = None
        if not self.active:
            return
        config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)
        self.tb = _summary_writer(run_dir)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if track:
            try:
                import wandb
            except ImportError:
                fail("--track needs Weights & Biases: `pip install wandb`, or drop --track")
            self.wandb = wandb.init(project=project, name=run_name or os.path.basename(run_dir.rstrip("/")),
                                    config=config, dir=run_dir)

    def log(self, metrics: dict, step: int) -> dict[str, float]:
        """Write one row; returns the values as Python floats (for check_finite)."""
        values = dict(zip(metrics, map(float, jax.device_get(list(metrics.values())))))  # one transfer
        if self.active:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
            tqdm.write(f"step {step}  " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()),
                       file=sys.stdout)
            if self.wandb is not None:
                self.wandb.log(values, step=step)
        return values

    def close(self):
        if self.active:
            self.tb.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()


# Checkpoint: ONE file, <dir>/checkpoint.npz, so arrays and metadata can never
# disagree. Entries "0".."N-1" are the pytree's leaves in flattening order;
# "__meta__" is UTF-8 JSON {"format", "step", "extra", "leaves": [{"name",
# "dtype", "shape", "key"}]}. Dtypes numpy lacks (bfloat16, ...) are stored as
# same-width unsigned ints; PRNG keys as their uint32 key data.
CHECKPOINT = "checkpoint.npz"


def _leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat], [x for _, x in flat], treedef


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: str, state, step: int, extra: dict | None = None) -> str:
    """Atomically replace <path>/checkpoint.npz by `state` (any pytree: nnx.State, keys, scalars).

    Every process must call it (sharded arrays are gathered); only process 0
    writes. `extra` must be JSON-serialisable. A crash mid-save leaves the
    previous checkpoint untouched: we write a temp file, fsync, then os.replace.
    """
    names, orig, _ = _leaves(state)
    leaves = [jax.random.key_data(x) if _is_key(x) else x for x in orig]
    leaves = [multihost_utils.process_allgather(x, tiled=True)
              if isinstance(x, jax.Array) and not x.is_fully_addressable else x for x in leaves]
    host = [np.asarray(x) for x in jax.device_get(leaves)]
    file = os.path.join(path, CHECKPOINT)
    if jax.process_index() != 0:
        return file
    meta = {"format": 1, "step": int(step), "extra": extra or {}, "leaves": []}
    arrays = {}
    for i, (name, o, x) in enumerate(zip(names, orig, host)):
        meta["leaves"].append({"name": name, "dtype": x.dtype.name, "shape": list(x.shape), "key": _is_key(o)})
        arrays[str(i)] = x.view(f"u{x.dtype.itemsize}") if x.dtype.kind == "V" else x  # e.g. bfloat16
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".{CHECKPOINT}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(path, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return file


def checkpoint_step(path: str) -> int | None:
    """Step of the checkpoint in `path`, or None if there is none (reads only the metadata)."""
    file = os.path.join(path, CHECKPOINT)
    if not os.path.exists(file):
        return None
    with np.load(file) as z:
        return json.loads(z["__meta__"].tobytes())["step"]


def restore_checkpoint(path: str, target):
    """Load <path>/checkpoint.npz into the structure, dtypes and shardings of `target`.

    Returns (state, step, extra), or None when there is no checkpoint. Then e.g.
    nnx.update(model, state["model"]); nnx.update(optimizer, state["optimizer"]).
    """
    file = os.path.join(path, CHECKPOINT)
    if not os.path.exists(file):
        return None
    names, leaves, treedef = _leaves(target)
    with np.load(file) as z:
        meta = json.loads(z["__meta__"].tobytes())
        saved = {m["name"]: (str(i), m) for i, m in enumerate(meta["leaves"])}
        for name in [n for n in saved if n not in set(names)]:
            fail(f"checkpoint {file} has a leaf {name!r} that the model/optimizer lacks; "
                 "was it written with other settings? (change them back, or use another --output-dir)")
        out = []
        for name, want in zip(names, leaves):
            if name not in saved:
                fail(f"checkpoint {file} has no leaf {name!r}; was it written with other settings?")
            key, m = saved[name]
            ref = jax.random.key_data(want) if _is_key(want) else want if isinstance(want, jax.Array) else np.asarray(want)
            if (tuple(m["shape"]), m["dtype"], m["key"]) != (ref.shape, jnp.dtype(ref.dtype).name, _is_key(want)):
                fail(f"checkpoint {file}: leaf {name!r} is {m['dtype']}{m['shape']} there but "
                     f"{jnp.dtype(ref.dtype).name}{list(ref.shape)} in the model/optimizer")
            x = z[key].view(jnp.dtype(m["dtype"]))
            if isinstance(want, jax.Array):  # onto the target's devices, one shard per device
                x = jax.make_array_from_callback(x.shape, want.sharding, lambda idx, x=x: x[idx])
                x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(want)) if _is_key(want) else x
            elif isinstance(want, (bool, int, float)):
                x = type(want)(x.item())
            out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out), meta["step"], meta["extra"]


def check_finite(metrics: dict, step: int, ckpt_dir: str) -> None:
    """Stop cleanly (one error line) when a metric is NaN/inf, pointing at the last checkpoint."""
    values = jax.device_get(list(metrics.values()))
    bad = [k for k, v in zip(metrics, values) if not math.isfinite(float(v))]
    if bad:
        last = checkpoint_step(ckpt_dir)
        where = ("no checkpoint was saved yet" if last is None else
                 f"the last good checkpoint is at {os.path.join(ckpt_dir, CHECKPOINT)} (step {last})")
        fail(f"{', '.join(bad)} became NaN/inf at step {step}; {where}")
