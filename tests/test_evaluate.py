"""evaluate.py in-process on the embedded pi_ref (assets/toy-t5) and a tiny random T5 with the
toy tokenizer: a policy against itself is 1/2 within sampling error, (i, j) + (j, i) = 1,
the better policy wins, groups of seeds, per-policy statistics, files written, a learned
judge, and bad input stopping with one line."""
import csv
import json

import numpy as np
import pytest
from flax import nnx

import common as C
import evaluate

TOY = C.TOY_MODEL
SMALL = dict(num_prompts=64, batch_size=64)


@pytest.fixture(scope="module")
def random_t5(tmp_path_factory):
    """A random tiny T5 with the toy tokenizer: a policy the oracle finds much worse than pi_ref."""
    from transformers import T5Config

    folder = str(tmp_path_factory.mktemp("random_t5"))
    tok = C.build_toy_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    C.save_t5(C.T5(cfg, rngs=nnx.Rngs(0)), tok, folder)
    C.save_toy_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def result(random_t5, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = evaluate.Args(policies=(f"ref={TOY}", f"ref={TOY}", f"random={random_t5}"), ref=TOY,
                         output_dir=str(out), **SMALL)
    return evaluate.main(args), out


def test_self_play_is_one_half_and_the_matrix_is_complementary(result):
    (r, _), n = result, 3
    mean, se = r["mean"], r["se"]
    # pi_ref against pi_ref (other samples), and each policy against a second sample of itself
    for i, j in [(0, 1), (0, 0), (1, 1), (2, 2)]:
        assert abs(mean[i, j] - 0.5) < 3 * se[i, j] + 1e-9, (i, j, mean[i, j], se[i, j])
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose((mean + mean.T)[off], 1.0, atol=1e-6)
    assert mean[0, 2] > 0.8 and mean[1, 2] > 0.8  # the oracle prefers pi_ref to a random T5
    assert 0 < se[0, 2] < 0.05 and se[0, 0] > 0  # the diagonal compares two independent samples


def test_policy_statistics_and_files(result, capsys):
    r, out = result
    ref_stats, random_stats = r["stats"][0], r["stats"][2]
    assert abs(ref_stats["kl"]) < 1e-4  # pi_ref against itself
    assert random_stats["kl"] > 1.0
    assert 1 <= ref_stats["length"] <= 12 and ref_stats["eos_rate"] > 0.9
    assert r["names"] == ["ref", "ref#2", "random"]
    rows = list(csv.DictReader(open(out / "win_rates.csv")))
    assert len(rows) == 9
    got = {(row["policy"], row["opponent"]): float(row["p_policy_beats_opponent"]) for row in rows}
    assert got[("ref", "random")] == pytest.approx(r["mean"][0, 2], abs=1e-6)
    assert len(list(csv.DictReader(open(out / "policies.csv")))) == 3
    try:
        import matplotlib  # noqa: F401
        assert (out / "heatmap.png").stat().st_size > 0
    except ImportError:
        assert not (out / "heatmap.png").exists()


def test_groups_of_seeds(random_t5, tmp_path, capsys):
    evaluate.main(evaluate.Args(policies=(f"a={TOY}", f"a={TOY}", f"b={random_t5}", f"b={random_t5}"),
                                output_dir=str(tmp_path), **SMALL))
    text = capsys.readouterr().out
    assert "groups: mean ± standard deviation over seed pairs" in text
    line = next(row for row in text.splitlines() if row.startswith("| a | ") and "±" in row and row.count("|") == 4)
    a_vs_a, a_vs_b = [float(c.split("±")[0]) for c in line.split("|")[2:4]]
    assert abs(a_vs_a - 0.5) < 0.15 and a_vs_b > 0.8
    if not any(line.startswith("note: matplotlib") for line in text.splitlines()):
        assert (tmp_path / "heatmap.png").exists()


def test_learned_judge(random_t5, tmp_path):
    """A saved preference model as --judge (untrained here, random head): still complementary."""
    t5, tok = C.load_t5(TOY)
    net = C.JudgeNet(t5, "pairwise", rngs=nnx.Rngs(1))
    net.out.kernel.set_value(0.1 * np.ones(net.out.kernel.shape, np.float32))  # not p = 1/2 everywhere
    C.save_judge(net, tok, str(tmp_path / "judge"), 20, 12)
    r = evaluate.main(evaluate.Args(policies=(TOY, random_t5), judge=str(tmp_path / "judge"),
                                    output_dir=str(tmp_path / "out"), **SMALL))
    m = r["mean"]
    np.testing.assert_allclose(m[0, 1] + m[1, 0], 1.0, atol=1e-6)
    assert m[0, 1] != 0.5


def test_bad_input_stops_with_one_line(random_t5, tmp_path):
    def stops(match, **kw):
        kw = {"output_dir": str(tmp_path / "out"), **SMALL, **kw}
        with pytest.raises(SystemExit, match=match) as e:
            evaluate.main(evaluate.Args(**kw))
        assert e.value.code.startswith("error: ") and "\n" not in e.value.code

    bert = tmp_path / "bert"
    bert.mkdir()
    json.dump({"model_type": "bert"}, open(bert / "config.json", "w"))
    stops(r"model_type is 'bert', expected 't5'", policies=(str(bert),))
    stops(r"not a preference model \(no judge.json\)", policies=(TOY,), judge=random_t5)
    from conftest import make_hf_t5
    other = str(tmp_path / "other_tokenizer")
    make_hf_t5(other, gated=False, tied=True)
    stops(r"other_tokenizer: its tokenizer \(48 tokens\) differs from the first policy's \(39 tokens\)",
          policies=(TOY, other))
    judge = tmp_path / "judge"
    t5, tok = C.load_t5(TOY)
    C.save_judge(C.JudgeNet(t5, "reward", rngs=nnx.Rngs(0)), tok, str(judge), 20, 12)
    stops(r"a preference model or value network, not a policy", policies=(str(judge),))
    stops(r"its tokenizer \(39 tokens\) differs from the policy's \(48 tokens\)", policies=(other,),
          judge=str(judge))
