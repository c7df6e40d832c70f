"""Sections 5 (Preferences) and 6 (Data): toy task, judges, loaders, tokenize."""
import json
import math

import numpy as np
import pytest

import common as C

X = "the cat sat on the dog and the cat saw a fox"  # topics in order: cat dog fox


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- toy task ----

def test_tokenizer_round_trip_and_auto_loading(tmp_path):
    from transformers import AutoTokenizer
    C.save_toy_tokenizer(str(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 3 + len(C.TOY_TOPIC_WORDS) + len(C.TOY_FILLER_WORDS)
    for text in C.toy_prompts(20, seed=3) + [C.toy_ideal_summary(X)]:
        ids = tok(text).input_ids
        assert ids[-1] == 1 and 2 not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("zebra cat").input_ids == [2, 3 + C.TOY_TOPIC_WORDS.index("cat"), 1]


def test_ids_match_vocabulary():
    tok = C.build_toy_tokenizer()
    words = C.TOY_TOPIC_WORDS + C.TOY_FILLER_WORDS
    assert tok(" ".join(words)).input_ids == list(range(3, 3 + len(words))) + [1]
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]


def test_prompts_are_deterministic_and_splits_differ():
    a, b = C.toy_prompts(50, 1), C.toy_prompts(50, 1)
    assert a == b and a != C.toy_prompts(50, 2)
    assert not set(C.toy_split("train", 200)) & set(C.toy_split("test", 200))
    for x in a:
        words = x.split()
        assert 8 <= len(words) <= 16
        assert 2 <= len(C.toy_ideal_summary(x).split()) <= 4


def test_oracle_prefers_ideal_over_each_corruption():
    ideal = C.toy_ideal_summary(X)
    assert ideal == "cat dog fox" and C.toy_reward(X, ideal) == 1.0
    # each corruption costs what the documented formula says (the length cost is 0.1 a word)
    corrupted = {"cat fox": 2 / 3, "cat the dog fox": 0.65, "cat dog fox cat": 0.65,
                 "cat dog fox owl": 0.4, "dog cat fox": 0.9, "": 0.0}
    for y, r in corrupted.items():
        assert C.toy_reward(X, y) == pytest.approx(r), y
    assert C.toy_reward(X, "cat dog fox owl") < C.toy_reward(X, "cat dog fox the")  # hallucination is worse
    junk = " ".join(["owl"] * 30)
    assert C.toy_reward(X, junk) == -1.0  # the bottom of the range [-1, 1]
    r = C.toy_rewards([X] * 2, [ideal, "cat"])
    assert r.dtype == np.float32 and r[0] > r[1]


def test_headroom_of_noisy_demonstrations():
    data = C.toy_sft_data(2000, seed=0)
    assert data == C.toy_sft_data(2000, seed=0)
    x = [d["prompt"] for d in data]
    ideal = [C.toy_ideal_summary(p) for p in x]
    p = C.toy_judge()(x, ideal, [d["completion"] for d in data])
    assert p.mean() >= 0.8  # the issue: ideal beats reference samples in >= 80% of comparisons
    assert 0.1 < np.mean([d["completion"] == i for d, i in zip(data, ideal)]) < 0.5  # imitable, not perfect


def test_pairwise_labels_follow_oracle_probabilities():
    # a fixed sampler: first call returns y_a, second y_b, with a known oracle p(y_a > y_b)
    n, ya, yb = 4000, "cat dog fox", "dog cat fox"  # differ only in order: reward 1.0 vs 0.9
    draws = iter([ya, yb])

    def sample_fn(xs):
        return [next(draws)] * len(xs)

    p = float(C.toy_judge()([X], [ya], [yb])[0])
    assert 0.05 < p < 0.95  # informative test: neither outcome is certain
    data = C.toy_pairwise_data([X] * n, sample_fn, seed=0)
    frac = np.mean([d["chosen"] == ya for d in data])
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert all({d["chosen"], d["rejected"]} == {ya, yb} for d in data)


def test_single_rewards_are_normalised():
    xs = C.toy_prompts(300, 0)
    demos = {d["prompt"]: d["completion"] for d in C.toy_sft_data(300, 0)}
    data = C.toy_single_data(xs, lambda b: [demos[x] for x in b])
    r = np.array([d["reward"] for d in data])
    assert abs(r.mean()) < 1e-6 and abs(r.var() - 1) < 1e-6
    raw = C.toy_rewards(xs, [demos[x] for x in xs])
    assert np.corrcoef(r, raw)[0, 1] > 0.999  # a monotone rescaling of the oracle
    # Constant rewards are centred, not blown up by a rounding-error std (0.1 is inexact in binary).
    const = C.normalise_rewards([{"reward": 0.1}] * 300)
    assert np.abs([d["reward"] for d in const]).max() < 1e-12
    assert C.normalise_rewards([]) == []


# ---- judges ----

def test_judges_are_probabilities_and_antisymmetric():
    judge = C.toy_judge()
    xs = C.toy_prompts(64, 5)
    y = [d["completion"] for d in C.toy_sft_data(64, 5)]
    y2 = [C.toy_ideal_summary(x) for x in xs]
    p, q = judge(xs, y, y2), judge(xs, y2, y)
    assert p.dtype == np.float32 and p.shape == (64,)
    assert ((p >= 0) & (p <= 1)).all() and np.allclose(p + q, 1, atol=1e-6)
    assert (judge(xs, y, y) == 0.5).all()


def test_bradley_terry_matches_hand_computation():
    reward = lambda xs, ys: np.array([len(y) for y in ys], float)
    judge = C.bradley_terry_judge(reward, temperature=2.0)
    p = judge(["x", "x"], ["abcd", "a"], ["a", "abc"])
    expected = [1 / (1 + math.exp(-(4 - 1) / 2)), 1 / (1 + math.exp(-(1 - 3) / 2))]
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    assert C.bradley_terry_judge(reward, 1e-3)(["x"], ["a" * 900], [""])[0] == 1.0  # no overflow


def test_check_preferences_rejects_bad_values():
    np.testing.assert_array_equal(C.check_preferences([0.0, 0.5, 1.0], "t"), [0, 0.5, 1])
    with pytest.raises(SystemExit, match="my judge.*nan.*index 1"):
        C.check_preferences([0.5, float("nan")], "my judge")
    with pytest.raises(SystemExit, match=r"1\.5"):
        C.check_preferences([1.5], "judge")
    with pytest.raises(SystemExit, match=r"judge: .*shape \(\) for 3 pairs"):
        C.check_preferences(0.5, "judge", 3)  # a scalar would broadcast over the batch unnoticed


# ---- loaders ----

def test_toy_loader():
    assert C.load_data("toy", "prompts", "test", n=5) == [{"prompt": x} for x in C.toy_split("test", 5)]
    sft = C.load_data("toy", "sft", n=5)
    assert [d["prompt"] for d in sft] == C.toy_split("train", 5) and all(d["completion"] for d in sft)
    pairs = C.load_data("toy", "pairwise", n=8, sample_fn=lambda xs: [C.toy_ideal_summary(x) for x in xs])
    assert len(pairs) == 8 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    with pytest.raises(SystemExit, match="sample_fn"):
        C.load_data("toy", "single")


def test_plain_schemas(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x1", "chosen": "a", "rejected": "b", "extra": 1}])
    assert C.load_data(f, "pairwise") == [{"prompt": "x1", "chosen": "a", "rejected": "b"}]
    assert C.load_data(f, "prompts") == [{"prompt": "x1"}]
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "completion": "y", "reward": r} for r in (1, 2, 3)] + [""])
    data = C.load_data(f, "single")
    np.testing.assert_allclose([d["reward"] for d in data], [-math.sqrt(1.5), 0, math.sqrt(1.5)])
    assert C.load_data(f, "sft", n=2) == [{"prompt": "x", "completion": "y"}] * 2


def test_summarize_from_feedback_folder(tmp_path):
    rec = {"info": {"id": "t3", "post": "My cat ate my homework.", "title": "Help", "subreddit": "cats",
                    "article": None, "site": None},
           "summaries": [{"text": " cat ate it", "policy": "sup"}, {"text": " homework gone", "policy": "ppo"}],
           "choice": 1, "worker": "w1", "batch": "b1", "split": "train"}
    write_jsonl(tmp_path / "train.jsonl", [rec])
    write_jsonl(tmp_path / "validation.jsonl", [dict(rec, choice=0)])
    [d] = C.load_data(str(tmp_path), "pairwise")
    assert (d["chosen"], d["rejected"]) == (" homework gone", " cat ate it")
    assert d["prompt"] == "SUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat ate my homework.\nTL;DR:"
    assert C.load_data(str(tmp_path), "pairwise", split="validation")[0]["chosen"] == " cat ate it"
    assert C.load_data(str(tmp_path), "prompts") == [{"prompt": d["prompt"]}]
    with pytest.raises(SystemExit, match=r"test\*\.jsonl"):
        C.load_data(str(tmp_path), "pairwise", split="test")


def test_xsum_schema(tmp_path):
    f = write_jsonl(tmp_path / "xsum.jsonl", [{"document": "Long news text.", "summary": "Short.", "id": "1"}])
    assert C.load_data(f, "prompts") == [{"prompt": "Long news text."}]
    assert C.load_data(f, "sft") == [{"prompt": "Long news text.", "completion": "Short."}]


def test_ultrafeedback_schema_counts_skipped(tmp_path, capsys):
    rec = {"source": "evol", "instruction": "Write a haiku.", "models": ["a", "b", "c"],
           "completions": [{"response": "r1", "overall_score": 8.0, "fine-grained_score": 4.5},
                           {"response": "r2", "overall_score": "N/A", "fine-grained_score": 2.0},
                           {"response": "r3", "overall_score": None, "fine-grained_score": None}]}
    data = C.load_data(write_jsonl(tmp_path / "uf.jsonl", [rec]), "single")
    assert [d["completion"] for d in data] == ["r1", "r2"] and data[0]["prompt"] == "Write a haiku."
    assert data[0]["reward"] > data[1]["reward"]  # 8.0 vs fine-grained 2.0, then normalised
    assert "skipped 1 completion" in capsys.readouterr().out


@pytest.mark.parametrize("kind, lines, match", [
    ("pairwise", ['{"prompt": "x", "chosen": "a", "rejected": "b"}', "{not json"], r"line 2: not valid JSON"),
    ("pairwise", [{"prompt": "x", "chosen": "a", "rejected": "b"}, {"prompt": "x", "chosen": "a"}], r"line 2: field 'rejected' is missing"),
    ("sft", [{"prompt": "x", "completion": "  "}], r"line 1: field 'completion' is missing or empty"),
    ("single", [{"prompt": "x", "completion": "y", "reward": "high"}], r"line 1: field 'reward' is not a finite number"),
    ("single", [{"prompt": "x", "completion": "y", "reward": float("nan")}], r"line 1: field 'reward' is not a finite"),
    ("pairwise", [{"info": {"post": "p"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2}], r"line 1: field 'choice'"),
    ("pairwise", [{"info": {"post": ""}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}], r"line 1: field 'info.post'"),
    ("prompts", [[1, 2]], r"line 1: the record is not a JSON object"),
    ("prompts", [""], r"no prompts records"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, kind, lines, match):
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SystemExit, match=r"bad\.jsonl.*" + match) as e:
        C.load_data(f, kind)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_bad_dataset_names(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        C.load_data(str(tmp_path / "missing.jsonl"), "prompts")
    with pytest.raises(SystemExit, match="unknown data kind 'pairs'"):
        C.load_data("toy", "pairs")
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed, whatever this machine has
    with pytest.raises(SystemExit, match="'no/such' .*pip install datasets.*local .jsonl"):
        C.load_data("no/such", "prompts")


def test_hub_failure_is_one_clear_line(monkeypatch):
    import sys
    import types
    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'no/such' on the Hub (LocalEntryNotFoundError)\nmore detail")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(SystemExit, match="could not load 'no/such'.*offline.*local .jsonl") as e:
        C.load_data("no/such", "prompts")
    assert "\n" not in str(e.value)
    # a reachable hub dataset goes through the same schema detection
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: [{"document": "d1", "summary": "s1", "id": "0"}]))
    assert C.load_data("EdinburghNLP/xsum", "sft") == [{"prompt": "d1", "completion": "s1"}]


# ---- tokenize ----

def test_tokenize_pads_truncates_and_keeps_eos():
    tok = C.build_toy_tokenizer()
    texts = ["cat dog", "cat dog fox owl bee ant", "the"]
    ids, mask, k = C.tokenize(tok, texts, max_len=4)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (3, 4) and k == 1
    cat, dog, fox = (3 + C.TOY_TOPIC_WORDS.index(w) for w in ("cat", "dog", "fox"))
    np.testing.assert_array_equal(ids, [[cat, dog, 1, 0], [cat, dog, fox, 1], [ids[2, 0], 1, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert C.tokenize(tok, texts, max_len=7)[2] == 0  # 6 words + EOS fit exactly
