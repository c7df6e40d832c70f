"""preference_model.py on tiny toy data (the embedded pi_ref assets/toy-t5): it beats chance
on held-out pairs; the saved judge reloads to the same probabilities, is symmetrised
(p(y > y') + p(y' > y) = 1), and drives an online script through --judge; bad judge
folders stop with one line. Runs in-process, so compiled functions are shared."""
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import common as C
import online_ipo
import preference_model

TINY = dict(steps=40, batch_size=16, num_examples=256, eval_pairs=96, log_every=10, eval_every=40,
            save_every=40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{kind: (run folder, final metrics)} of a tiny run of each kind."""
    out = {}
    for kind in ("pairwise", "reward"):
        d = str(tmp_path_factory.mktemp(kind))
        out[kind] = d, preference_model.main(preference_model.Args(output_dir=d, kind=kind, **TINY))
    return out


@functools.cache
def held_out(n=64):
    """Pairs of pi_ref samples on the test split, oriented so that the oracle prefers the first."""
    ref, tok = C.load_t5(C.TOY_MODEL)
    fn = C.text_sampler(ref, tok, jax.random.key(5), 20, 12)
    x = C.toy_split("test", n)
    a, b = fn(x), fn(x)
    ra, rb = C.toy_rewards(x, a), C.toy_rewards(x, b)
    keep = ra != rb
    first = [u if r > s else v for u, v, r, s in zip(a, b, ra, rb)]
    second = [v if r > s else u for u, v, r, s in zip(a, b, ra, rb)]
    pick = lambda seq: [s for s, k in zip(seq, keep) if k]
    return pick(x), pick(first), pick(second)


@pytest.mark.parametrize("kind", ["pairwise", "reward"])
def test_trains_and_beats_chance_on_held_out_pairs(kind, trained):
    out, final = trained[kind]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"loss/logistic", "loss/grad_norm", "train/accuracy", "train/symmetry_gap"} <= set(rows[0])
    losses = [r["loss/logistic"] for r in rows if "loss/logistic" in r]
    assert losses[-1] < losses[0] < np.log(2) + 1e-3  # starts at p = 1/2 and goes down
    assert final["eval/accuracy"] > 0.7, final  # vs the oracle's preferred response; chance is 0.5
    if kind == "reward":
        assert final["eval/symmetry_gap"] < 1e-6  # antisymmetric by construction
    else:
        assert final["eval/symmetry_gap"] > 1e-4  # a pairwise model is not: the gap is measured
    # The saved judge reloads and agrees with the oracle on fresh pairs (test split) too.
    x, a, b = held_out()
    p = C.load_judge(out)(x, a, b)
    assert ((p > 0.5) + 0.5 * (p == 0.5)).mean() > 0.7


def test_symmetrised_probabilities_sum_to_one(trained):
    out, _ = trained["pairwise"]
    x, a, b = held_out()
    judge = C.load_judge(out)
    np.testing.assert_allclose(judge(x, a, b) + judge(x, b, a), 1.0, atol=1e-6)
    # the raw model is not symmetric, so the averaging is what makes the sum 1
    net, tok = load_net(out)
    raw = C.judge_from_net(net, tok, 20, 12, symmetrise=False)
    assert np.abs(raw(x, a, b) + raw(x, b, a) - 1.0).max() > 1e-4
    np.testing.assert_allclose(judge(x, a, b), 0.5 * (raw(x, a, b) + 1 - raw(x, b, a)), atol=1e-6)


@pytest.mark.parametrize("kind", ["pairwise", "reward"])
def test_both_orders_from_one_pass_equal_separate_features(kind):
    """The training loss and the symmetrised judge take both orders from one decoder pass over [y; y']:
    the same scores as features computed response by response."""
    t5, tok = C.load_t5(C.TOY_MODEL)
    net = C.JudgeNet(t5, kind, rngs=nnx.Rngs(0))
    net.out.kernel.set_value(jax.random.normal(jax.random.key(1), net.out.kernel.shape))  # not the zero init
    x, a, b = (v[:16] for v in held_out())
    (xi, xm), (ai, am), (bi, bm) = (C.tokenize(tok, t, n)[:2] for t, n in ((x, 20), (a, 12), (b, 12)))
    kv = t5.cross_kv(t5.encode(xi, xm))
    ua, ub = net.features(kv, xm, ai, am), net.features(kv, xm, bi, bm)
    want = (net.pair_logit(ua, ub), net.pair_logit(ub, ua)) if kind == "pairwise" else (
        net.out(ua)[:, 0], net.out(ub)[:, 0])
    got = nnx.jit(lambda n, *arrays: n.both_orders(*arrays))(net, xi, xm, ai, am, bi, bm)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert np.abs(np.asarray(got[0]) - np.asarray(got[1])).max() > 1e-3  # the two orders differ


@pytest.mark.parametrize("kind", ["pairwise", "reward"])
def test_judge_of_no_pairs_returns_no_preferences(kind):
    t5, tok = C.load_t5(C.TOY_MODEL)
    judge = C.judge_from_net(C.JudgeNet(t5, kind, rngs=nnx.Rngs(0)), tok, 20, 12)
    assert judge([], [], []).shape == (0,)


def load_net(path):
    """The JudgeNet of a saved folder, as load_judge builds it (for the raw probabilities)."""
    from safetensors.numpy import load_file
    t5, tok = C.load_t5(os.path.join(path, "model"))
    net = C.JudgeNet(t5, "pairwise", rngs=nnx.Rngs(0))
    head = load_file(os.path.join(path, "model", "judge_head.safetensors"))
    for name in head:
        layer, w = name.split(".")
        getattr(getattr(net, layer), w).set_value(head[name])
    return net, tok


def test_online_script_trains_against_a_saved_judge(trained, tmp_path):
    """--judge <run folder>: the judge's p is what the policy is trained on (logged as rewards/preference)."""
    out, _ = trained["pairwise"]
    kw = dict(steps=1, batch_size=4, num_prompts=16, eval_prompts=8, max_completion_len=12, log_every=1,
              eval_every=1, save_every=1)
    learned = online_ipo.main(online_ipo.Args(judge=out, output_dir=str(tmp_path / "learned"), **kw))
    oracle = online_ipo.main(online_ipo.Args(judge="toy", output_dir=str(tmp_path / "oracle"), **kw))
    assert learned["eval/win_rate"] != oracle["eval/win_rate"]  # same samples, another judge
    row = json.loads(open(tmp_path / "learned" / "metrics.jsonl").readline())
    assert 0 < row["rewards/preference"] < 1
    assert os.path.exists(tmp_path / "learned" / "model" / "model.safetensors")


def test_bad_judge_folders_stop_with_one_line(trained, tmp_path):
    def stops(match, *args):
        with pytest.raises(SystemExit, match=match) as e:
            C.load_judge(*args)
        assert e.value.code.startswith("error: ") and "\n" not in e.value.code

    stops(r"not a preference model \(no judge.json\)", C.TOY_MODEL)  # a policy, not a judge
    stops(r"not a preference model", str(tmp_path / "missing"))
    wrong = tmp_path / "wrong_kind"
    shutil.copytree(os.path.join(trained["pairwise"][0], "model"), wrong)
    json.dump({"kind": "value", "max_prompt_len": 20, "max_completion_len": 12}, open(wrong / "judge.json", "w"))
    stops(r"kind is 'value', expected one of \['pairwise', 'reward'\]", str(wrong))
    from conftest import save_word_tokenizer
    other = save_word_tokenizer(str(tmp_path / "other_tok"), 39)  # same size, other words
    stops(r"its tokenizer \(39 tokens\) differs from the policy's \(39 tokens\)", trained["pairwise"][0], other)


def test_trains_on_local_summarize_from_feedback_records(tmp_path):
    """The hub schema of openai/summarize_from_feedback, from a local file: the last
    --eval-pairs records are held out and scored against their human choice."""
    docs = C.toy_split("train", 40, seed=3)
    pair = lambda d: [{"text": C.toy_ideal_summary(d)}, {"text": "the a"}]
    # the ideal summary is the chosen one, in either position
    rows = [{"info": {"id": str(i), "post": d}, "summaries": pair(d)[::1 - 2 * (i % 2)], "choice": i % 2}
            for i, d in enumerate(docs)]
    data = tmp_path / "comparisons.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    final = preference_model.main(preference_model.Args(
        dataset=str(data), output_dir=str(out), **{**TINY, "num_examples": None, "eval_pairs": 8, "steps": 20}))
    assert final["eval/accuracy"] > 0.5  # ideal summaries against filler: learnt in a few steps
    p = C.load_judge(str(out))([docs[0]], [C.toy_ideal_summary(docs[0])], ["the a"])
    assert p.shape == (1,) and p[0] > 0.5
    with pytest.raises(SystemExit, match=r"40 pairs leave none for training after holding out --eval-pairs 40"):
        preference_model.main(preference_model.Args(dataset=str(data), output_dir=str(tmp_path / "x"),
                                                     **{**TINY, "num_examples": None, "eval_pairs": 40}))
