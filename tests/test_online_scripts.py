"""online_ipo.py, ipo_md.py and nash_md.py end to end on a tiny random T5 with the
toy tokenizer: they train, log, checkpoint, resume and save a model PyTorch
loads; IPO-MD at beta = 0 is online IPO; the mixture at beta = 1 is pi_ref; bad
inputs and bad judges stop with one clear line. Runs in-process (jit caches are
shared between runs), except one 8-device run and one exit-status check."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import common as C
import ipo_md
import nash_md
import online_ipo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"online_ipo": online_ipo, "ipo_md": ipo_md, "nash_md": nash_md}
TINY = dict(steps=2, batch_size=4, num_prompts=16, eval_prompts=8, max_completion_len=5, log_every=1,
            eval_every=2, save_every=2)
# Every sampler call is 8 rows x 5 tokens (2B for the IPOs, B = 8 for Nash-MD, 8 evaluation
# prompts), so each compiled sampler is shared by all runs of the process.
BATCH = {"online_ipo": 4, "ipo_md": 4, "nash_md": 8}


@pytest.fixture(scope="module")
def toy_t5(tmp_path_factory):
    """A random tiny T5 with the toy tokenizer, so that the toy oracle has words to judge. Original
    T5 layout (tied embeddings, logits scaled by d_model^-0.5): random logits of order 1, so two
    samples differ and the first step already has a gradient."""
    from transformers import T5Config

    folder = str(tmp_path_factory.mktemp("toy_t5"))
    tok = C.build_toy_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    C.save_t5(C.T5(cfg, rngs=nnx.Rngs(0)), tok, folder)
    C.save_toy_tokenizer(folder)
    return folder


def run(name, model, out, **kw):
    mod = SCRIPTS[name]
    return mod.main(mod.Args(model=model, output_dir=str(out), **{**TINY, "batch_size": BATCH[name], **kw}))


def metrics(out):
    """metrics.jsonl -> {step: {name: value}} (training and evaluation rows merged)."""
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        rows.setdefault(r.pop("step"), {}).update(r)
    return rows


@pytest.fixture(scope="module")
def eight_devices(toy_t5, tmp_path_factory):
    """nash_md.py on an 8-device CPU mesh (fsdp 4 x data 2), in a subprocess started before the
    in-process runs: XLA compiles on one core, so the two processes compile side by side."""
    out = tmp_path_factory.mktemp("eight_devices")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    # cheaper XLA compilation (a third less CPU here); float semantics are unchanged
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    cmd = [sys.executable, "nash_md.py", "--model", toy_t5, "--output-dir", str(out), "--fsdp", "4"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "batch_size": BATCH["nash_md"]}.items()]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    proc.kill()


@pytest.fixture(scope="module")
def runs(toy_t5, eight_devices, tmp_path_factory):
    """Each script once on tiny settings: {name: (output dir, final metrics)}."""
    out = {}
    for name in SCRIPTS:
        d = tmp_path_factory.mktemp(name)
        out[name] = (str(d), run(name, toy_t5, d))
    return out


COMMON_KEYS = {"eval/win_rate_se", "loss/grad_norm", "rewards/preference", "samples/length", "samples/eos_rate", "samples/same_pair",
               "perf/sample_s", "perf/judge_s", "perf/update_s", "perf/prompts_per_s", "eval/win_rate",
               "eval/kl", "eval/length", "eval/eos_rate"}
PAIR_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
             "logps/rejected"}
KEYS = {"online_ipo": COMMON_KEYS | PAIR_KEYS | {"loss/ipo"}, "ipo_md": COMMON_KEYS | PAIR_KEYS | {"loss/ipo_md"},
        "nash_md": COMMON_KEYS | {"loss/nash_md", "rewards/advantage", "rewards/implicit", "logps/policy",
                                  "logps/ref"}}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_logs_and_saves_a_model_pytorch_loads(name, runs, toy_t5):
    import torch
    from transformers import T5ForConditionalGeneration

    out, final = runs[name]
    rows = metrics(out)
    assert sorted(rows) == [1, 2]
    assert set(rows[2]) == KEYS[name], set(rows[2]) ^ KEYS[name]
    assert all(np.isfinite(v) for v in rows[2].values())
    assert 0 <= final["eval/win_rate"] <= 1 and final == {k: rows[2][k] for k in final}
    assert 0 <= rows[1]["rewards/preference"] <= 1 and 1 <= rows[1]["samples/length"] <= TINY["max_completion_len"]
    assert C.checkpoint_step(out) == 2

    # The saved policy: trained (not pi_ref), and PyTorch computes the same log-probs from it.
    # (Models, prompts and completions placed as in the scripts' evaluation: compiled already.)
    mesh = C.make_mesh()
    saved, tok = C.load_t5(os.path.join(out, "model"))
    ref, _ = C.load_t5(toy_t5)
    C.shard_model(saved, mesh), C.shard_model(ref, mesh)
    x, xm, _ = C.tokenize(tok, C.toy_split("test", 8), 20)
    y, ym, _ = C.sample(ref, x, xm, jax.random.key(1), TINY["max_completion_len"])
    logps = np.asarray(C.sequence_logps(saved, x, xm, y, ym))
    assert np.abs(logps - np.asarray(C.sequence_logps(ref, x, xm, y, ym))).max() > 1e-3
    pt = T5ForConditionalGeneration.from_pretrained(os.path.join(out, "model")).eval()
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        logits = pt(input_ids=t(x), attention_mask=t(xm), decoder_input_ids=t(C.shift_right(y, 0))).logits
        want = (torch.log_softmax(logits, -1).gather(-1, t(y)[..., None])[..., 0] * t(ym)).sum(-1)
    np.testing.assert_allclose(logps, want.numpy(), rtol=1e-4, atol=1e-4)


def test_ipo_md_at_beta_0_is_online_ipo(runs, toy_t5, tmp_path):
    """Same seed, same samples, same judge, same losses and updates. (While pi_theta = pi_ref,
    every beta samples alike; that beta > 0 changes the samples is tested on a policy far from
    pi_ref below.)"""
    run("ipo_md", toy_t5, tmp_path, beta=0.0)
    a, b = metrics(runs["online_ipo"][0]), metrics(tmp_path)
    for step in (1, 2):  # same samples, same judge, same losses: step 2 also checks the update
        for k in PAIR_KEYS | {"rewards/preference", "samples/length", "loss/grad_norm"}:
            np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-5, atol=1e-6, err_msg=f"{k} {step}")
        np.testing.assert_allclose(b[step]["loss/ipo_md"], a[step]["loss/ipo"], rtol=1e-5)


@pytest.mark.parametrize("mod", [ipo_md, nash_md], ids=["ipo_md", "nash_md"])
def test_mixture_at_beta_1_samples_pi_ref(mod, runs, toy_t5):
    ref, tok = C.load_t5(toy_t5)
    policy, _ = C.load_t5(toy_t5)  # made far from pi_ref: its (tied) embedding rows rolled by one
    policy.shared[...] = jnp.asarray(np.roll(np.asarray(policy.shared[...]), 1, axis=0))
    mesh = C.make_mesh()  # placed as in the scripts: the samplers are compiled already
    C.shard_model(policy, mesh), C.shard_model(ref, mesh)
    x, xm, _ = C.tokenize(tok, C.toy_split("test", 8), 20)
    key = jax.random.key(3)
    draw = lambda beta: np.asarray(mod.sample_mixture(policy, ref, x, xm, key, beta, 5, 1.0)[0])
    from_ref = np.asarray(C.sample(ref, x, xm, key, 5)[0])
    from_policy = np.asarray(C.sample(policy, x, xm, key, 5)[0])
    assert not np.array_equal(from_ref, from_policy)
    np.testing.assert_array_equal(draw(1.0), from_ref)
    np.testing.assert_array_equal(draw(0.0), from_policy)
    # the general path (both models in the loop) agrees at the end points too
    np.testing.assert_array_equal(np.asarray(C.sample(policy, x, xm, key, 5, ref=ref, beta=1.0)[0]), from_ref)
    assert not np.array_equal(draw(0.5), from_ref) and not np.array_equal(draw(0.125), from_policy)


def test_resume_continues_exactly(runs, toy_t5, tmp_path):
    """Stop after step 2 (the fixture's run) and resume to 3 == 3 steps straight (policy, optimiser, key)."""
    resumed = tmp_path / "resumed"
    straight = tmp_path / "straight"
    import shutil
    shutil.copytree(runs["online_ipo"][0], resumed)
    run("online_ipo", toy_t5, resumed, steps=3, save_every=1)
    run("online_ipo", toy_t5, straight, steps=3, save_every=1)
    with np.load(resumed / C.CHECKPOINT) as a, np.load(straight / C.CHECKPOINT) as b:
        assert set(a.files) == set(b.files) and len(a.files) > 10
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    a, b = metrics(resumed)[3], metrics(straight)[3]
    assert {k: v for k, v in a.items() if "perf/" not in k} == {k: v for k, v in b.items() if "perf/" not in k}


BAD_ARGS = [
    ("online_ipo", dict(tau=0.0), r"--tau 0.0 must be > 0"),
    ("ipo_md", dict(tau=-1.0), r"--tau -1.0 must be > 0"),
    ("nash_md", dict(tau=0.0), r"--tau 0.0 must be > 0"),
    ("ipo_md", dict(beta=-0.1), r"--beta -0.1 must be in \[0, 1\]"),
    ("nash_md", dict(beta=1.5), r"--beta 1.5 must be in \[0, 1\]"),
    ("online_ipo", dict(judge="runs/pm"), r"--judge runs/pm: not a preference model \(no judge.json\)"),
    ("nash_md", dict(eval_prompts=0), r"--eval-prompts 0 must be >= 1"),
]


@pytest.mark.parametrize("name,kw,match", BAD_ARGS)
def test_bad_arguments_stop_with_one_line(name, kw, match, toy_t5, tmp_path):
    with pytest.raises(SystemExit, match=match) as e:
        run(name, toy_t5, tmp_path, **kw)
    # a string exit code: Python prints it as one line on stderr and exits with status 1
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code


@pytest.mark.parametrize("name", SCRIPTS)
def test_dataset_without_prompts_stops(name, toy_t5, tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match=r"prompts.jsonl: no prompts records"):
        run(name, toy_t5, tmp_path / "out", dataset=str(empty))
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"cat dog {i}"}) + "\n" for i in range(8)))
    with pytest.raises(SystemExit, match=r"8 prompts leave none for training"):
        run(name, toy_t5, tmp_path / "out", dataset=str(few))


@pytest.mark.parametrize("name,value,match", [
    ("online_ipo", np.nan, r"got nan at index 1"), ("ipo_md", 1.5, r"got 1.5 at index 1"),
    ("nash_md", -0.25, r"got -0.25 at index 1")])
def test_bad_judge_values_stop(name, value, match, toy_t5, tmp_path, monkeypatch):
    def judge(prompts, ys, ys2):
        p = np.full(len(prompts), 0.5, np.float32)
        p[1] = value
        return p
    B = BATCH[name]

    monkeypatch.setattr(SCRIPTS[name], "make_judge", lambda *_: judge)
    with pytest.raises(SystemExit, match=r"--judge toy at step 1: preference p\(y > y'\|x\) must be in \[0, 1\], "
                                         + match):
        run(name, toy_t5, tmp_path)
    assert C.checkpoint_step(str(tmp_path)) is None  # nothing was trained on it
    monkeypatch.setattr(SCRIPTS[name], "make_judge", lambda *_: lambda x, y, y2: np.full(2, 0.5, np.float32))
    with pytest.raises(SystemExit, match=rf"--judge toy at step 1: the judge returned preferences of shape \(2,\) for {B} pairs"):
        run(name, toy_t5, tmp_path)


def test_runs_on_8_devices(runs, eight_devices):
    """nash_md.py (both samplers, the mixture included) on 8 devices takes the 1-device run's
    steps: the same samples, preferences, losses and updates (to reduction order)."""
    proc, out = eight_devices
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    a, b = metrics(runs["nash_md"][0]), metrics(out)
    for step in (1, 2):
        for k in a[step]:
            if not k.startswith("perf/"):
                np.testing.assert_allclose(b[step][k], a[step][k], rtol=1e-3, atol=1e-3, err_msg=f"{k} {step}")
    assert os.path.exists(out / "model" / "model.safetensors")
