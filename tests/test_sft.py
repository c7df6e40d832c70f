"""sft.py end to end on tiny settings (in-process, and as a command on 2 devices whose
output PyTorch loads), resuming after a crash and with more steps, --help, and the
shipped reference policy assets/toy-t5 (loads; leaves the promised headroom)."""
import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tyro
from flax import nnx

import common as C
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 256 evaluation prompts and 20/12 tokens: the shapes of the shipped-model check below,
# so the sampler compiles once for both.
TINY = dict(steps=5, batch_size=8, num_examples=32, eval_prompts=256, log_every=1, eval_every=2,
            save_every=2, warmup_steps=2)


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """`python sft.py --steps 3` on 2 CPU devices, started first so that it overlaps the
    in-process runs; a later test reruns its folder with more steps on one device."""
    out = str(tmp_path_factory.mktemp("command"))
    # Optimisation level 0 compiles in about 2/3 of the time; no test compares this run's
    # numbers with the in-process runs.
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "steps": 3}.items()]
    proc = subprocess.Popen([sys.executable, "sft.py", "--output-dir", out, *flags], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return out, proc


@pytest.fixture(scope="module")
def command_done(command):
    out, proc = command
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stdout


@pytest.fixture(scope="module")
def straight(command, tmp_path_factory):
    """In-process: TINY straight through -> (output_dir, final eval metrics). (Asks for
    `command` only so that the command starts first.)"""
    out = str(tmp_path_factory.mktemp("straight"))
    return out, sft.main(sft.Args(output_dir=out, **TINY))


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def crashed(straight, tmp_path_factory):
    """In-process: the TINY run again, crashing in step 3 (the checkpoint is at step 2)."""
    out = str(tmp_path_factory.mktemp("crashed"))
    real_indices, calls = sft.C.batch_indices, []

    def crashing_indices(*args):  # called once per step, just before the train step
        if len(calls) == 2:
            raise Crash
        calls.append(1)
        return real_indices(*args)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Crash):
        mp.setattr(sft.C, "batch_indices", crashing_indices)
        sft.main(sft.Args(output_dir=out, **TINY))
    return out


def metrics(output_dir):
    """metrics.jsonl as {step: merged row}, and the steps of the training rows in file order."""
    rows, train_steps = {}, []
    for line in open(os.path.join(output_dir, "metrics.jsonl")):
        r = json.loads(line)
        if "loss/nll" in r:
            train_steps.append(r["step"])
        rows.setdefault(r.pop("step"), {}).update(r)
    return rows, train_steps


def params(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_runs_end_to_end_logs_and_saves(straight):
    out, final = straight
    assert sorted(os.listdir(os.path.join(out, "model"))) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert C.checkpoint_step(out) == 5
    assert json.load(open(os.path.join(out, "config.json")))["steps"] == 5  # the Args
    rows, train_steps = metrics(out)
    assert train_steps == [1, 2, 3, 4, 5]
    assert all(np.isfinite(rows[s]["loss/nll"]) and rows[s]["perf/tokens_per_s"] > 0 for s in train_steps)
    assert rows[5]["loss/nll"] < rows[1]["loss/nll"]  # it learns
    assert [s for s in rows if "eval/loss" in rows[s]] == [2, 4, 5]
    assert set(final) == {"eval/loss", "eval/reward", "eval/headroom", "eval/exact_match", "eval/length",
                          "eval/eos_rate"}
    assert final == {k: rows[5][k] for k in final}
    assert 0 <= final["eval/headroom"] <= 1 and 0 <= final["eval/eos_rate"] <= 1
    assert -1 <= final["eval/reward"] <= 1 and 1 <= final["eval/length"] <= 12


def test_rerun_after_a_crash_resumes_and_ends_like_an_uninterrupted_run(straight, crashed, capsys):
    assert C.checkpoint_step(crashed) == 2 and not os.path.exists(os.path.join(crashed, "model"))
    assert sft.main(sft.Args(output_dir=crashed, **TINY)) == straight[1]
    assert "resumed from step 2" in capsys.readouterr().out
    assert metrics(crashed)[1] == [1, 2, 3, 4, 5]  # steps 1-2 were not trained again
    # the same weights: optimiser state, schedule and data order came back too
    want = params(os.path.join(straight[0], "model"))
    for n, x in params(os.path.join(crashed, "model")).items():
        np.testing.assert_array_equal(x, want[n], err_msg=n)


def test_jsonl_data_from_a_saved_model_is_evaluated_by_held_out_loss(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in C.toy_sft_data(40, 5)))
    args = dict(TINY, eval_prompts=8, num_examples=None)
    final = sft.main(sft.Args(model=C.TOY_MODEL, dataset=str(data), output_dir=str(tmp_path / "run"), **args))
    assert list(final) == ["eval/loss"] and np.isfinite(final["eval/loss"])  # no oracle for real data
    assert "train: 32 examples" in capsys.readouterr().out  # the last 8 records are held out
    with pytest.raises(SystemExit, match="40 records leave none for training"):
        sft.main(sft.Args(model=C.TOY_MODEL, dataset=str(data), output_dir=str(tmp_path / "r2"),
                          **dict(args, eval_prompts=40)))
    with pytest.raises(SystemExit, match="--model toy knows only the toy task's words"):
        sft.main(sft.Args(dataset=str(data), output_dir=str(tmp_path / "r3")))


def field_docs():
    """{field: the docstring under it}, read from sft.py's source."""
    cls = next(n for n in ast.parse(open(sft.__file__).read()).body if getattr(n, "name", "") == "Args")
    return {a.target.id: b.value.value for a, b in zip(cls.body, cls.body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}


def test_help_mentions_every_field_and_its_docstring(capsys):
    docs = field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(sft.Args)}, "a field without a docstring"
    with pytest.raises(SystemExit) as e:
        tyro.cli(sft.Args, args=["--help"])
    assert e.value.code == 0
    out = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())  # undo tyro's box and wrapping
    for name, doc in docs.items():
        assert f"--{name.replace('_', '-')}" in out, name
        assert " ".join(doc.split()[:6]) in out, name


# The shipped reference policy: what every algorithm script starts from.
@pytest.fixture(scope="module")
def toy_samples():
    model, tokenizer = C.load_t5(C.TOY_MODEL)
    C.shard_model(model, C.make_mesh())  # placed as sft.py places its model: reuses its compiled sampler
    prompts = C.toy_split("test", 256)  # held out: sft.py trains on "train", evaluates on "validation"
    x, xm, _ = C.tokenize(tokenizer, prompts, 20)
    y, ym, _ = C.sample(model, x, xm, jax.random.key(0), 12)
    return model, tokenizer, prompts, C.decode(tokenizer, y, ym), np.asarray(y), np.asarray(ym)


def test_toy_model_is_what_sft_makes(toy_samples):
    model, tokenizer, *_ = toy_samples
    config = json.load(open(os.path.join(C.TOY_MODEL, "config.json")))
    assert {k: config[k] for k in sft.TOY_T5} == sft.TOY_T5
    assert config["vocab_size"] == len(C.build_toy_tokenizer()) == len(tokenizer)
    text = " ".join(C.TOY_TOPIC_WORDS + C.TOY_FILLER_WORDS)
    assert tokenizer(text)["input_ids"] == C.build_toy_tokenizer()(text)["input_ids"]
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) < 1_000_000
    assert sum(os.path.getsize(os.path.join(C.TOY_MODEL, f)) for f in os.listdir(C.TOY_MODEL)) < 2_000_000


def test_toy_model_is_decent_but_clearly_improvable(toy_samples):
    model, _, prompts, ys, y, ym = toy_samples
    ideal = [C.toy_ideal_summary(p) for p in prompts]
    headroom = C.toy_judge()(prompts, ideal, ys).mean()
    assert 0.8 <= headroom <= 0.97, headroom  # the ideal summary usually wins, but not always
    # well-formed: ends with EOS, mostly words of the document, better than saying nothing
    assert (y == model.spec.eos_id).any(-1).mean() >= 0.95
    words = [(w, p.split()) for p, s in zip(prompts, ys) for w in s.split()]
    assert np.mean([w in doc for w, doc in words]) >= 0.8  # the demonstrations: 0.94
    assert C.toy_rewards(prompts, ys).mean() > 0.2
    assert np.mean([a == b for a, b in zip(ys, ideal)]) < 0.5


# Last: by now the command, started before the in-process runs, has had time to finish.
def test_command_runs_end_to_end_on_two_devices(command_done):
    out, stdout = command_done
    assert "mesh: {'data': 1, 'fsdp': 2} over 2 cpu devices" in stdout
    assert "train: 32 examples; truncated 0 prompts" in stdout and "held-out: 256 examples" in stdout
    assert "saved " in stdout and "resumed" not in stdout
    assert metrics(out)[1] == [1, 2, 3] and C.checkpoint_step(out) == 3


def test_command_output_loads_in_pytorch_to_the_same_logits(command_done):
    import torch
    from transformers import T5ForConditionalGeneration

    folder = os.path.join(command_done[0], "model")
    model, tokenizer = C.load_t5(folder)
    theirs = T5ForConditionalGeneration.from_pretrained(folder).eval()
    prompts = C.toy_split("test", 4)
    x, xm, _ = C.tokenize(tokenizer, prompts, 20)
    y, ym, _ = C.tokenize(tokenizer, [C.toy_ideal_summary(p) for p in prompts], 8)
    dec = np.asarray(C.shift_right(y, model.spec.start_id))
    ours = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, xm, dec))  # eager would compile op by op
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(x, dtype=torch.long), attention_mask=torch.tensor(xm),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    valid = ym.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref).max() > 0.1


def test_rerun_with_more_steps_resumes(command_done, tmp_path, capsys):
    """The command's 3-step run (2 devices), rerun with 5 steps here (1 device)."""
    out = str(tmp_path / "run")
    shutil.copytree(command_done[0], out)
    before = params(os.path.join(out, "model"))
    sft.main(sft.Args(output_dir=out, **TINY))
    assert "resumed from step 3" in capsys.readouterr().out
    assert metrics(out)[1] == [1, 2, 3, 4, 5]  # steps 1-3 were not trained again
    after = params(os.path.join(out, "model"))
    assert max(np.abs(after[n] - before[n]).max() for n in after) > 1e-5
