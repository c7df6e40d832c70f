import glob
import json
import math
import os

import numpy as np

from common import fail

# ---- 5. Preferences ----
# A judge is a host-side callable judge(prompts, ys, ys2) -> np.float32 [B] holding
# p(y > y' | x) in [0, 1]. Anything with that signature works (the toy oracle,
# Bradley-Terry over a reward function, a trained T5 preference model).


def check_preferences(p, where: str) -> np.ndarray:
    """Return p as float32, or stop if any value is NaN or outside [0, 1]."""
    p = np.asarray(p, dtype=np.float32)
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN fails both comparisons
    if bad.size:
        i = int(bad[0])
        fail(f"{where}: preference p(y > y'|x) must be in [0, 1], got {p.flat[i]} at index {i} "
             f"({bad.size} of {p.size} bad); check the judge (a probability, not a logit or reward)")
    return p


def bradley_terry_judge(reward_fn, temperature: float = 1.0):
    """Judge p(y > y'|x) = sigmoid((r(x, y) - r(x, y')) / temperature) from a batched
    reward function reward_fn(prompts, completions) -> [B] (Bradley-Terry model)."""
    if not temperature > 0:
        fail(f"judge temperature must be > 0, got {temperature}")

    def judge(prompts, ys, ys2):
        if not len(prompts) == len(ys) == len(ys2):
            fail(f"judge: got {len(prompts)} prompts, {len(ys)} y and {len(ys2)} y'; they must match")
        z = (np.asarray(reward_fn(prompts, ys), np.float64)
             - np.asarray(reward_fn(prompts, ys2), np.float64)) / temperature
        # tanh form is overflow-free and exactly 0.5 at z = 0, and p(y>y') + p(y'>y) = 1.
        return check_preferences(0.5 * (1.0 + np.tanh(0.5 * z)), "judge")

    return judge


# T = 0.1: against the ideal summary a content error (missing topic word >= 0.25,
# filler 0.35, hallucination >= 0.6) gives p >= 0.92; an order slip (0.07-0.2) gives
# p = 0.66-0.88. Decisive on content, softer on order, exactly 0.5 for ties.
TOY_JUDGE_TEMPERATURE = 0.1


def toy_judge(temperature: float = TOY_JUDGE_TEMPERATURE):
    """The embedded task's exact oracle: Bradley-Terry over toy_reward."""
    return bradley_terry_judge(toy_rewards, temperature)


# ---- 6. Data ----
# The embedded toy task: a miniature of summarisation with an exact judge.
# A document is 8-16 words; 2-4 distinct topic words (some repeated) scattered among
# filler words. Its ideal summary is its topic words in order of first appearance,
# without repeats. A tiny T5 learns this copy task in a minute on CPU.
TOY_TOPIC_WORDS = ("cat dog bird fish horse cow sheep goat lion tiger bear wolf "
                   "fox deer frog duck owl bee ant mouse").split()
TOY_FILLER_WORDS = "the a of and to in is on with at it was for by as that".split()
TOY_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5 ids 0 (also decoder start), 1, 2
_TOPIC = frozenset(TOY_TOPIC_WORDS)
_SPLITS = {"train": 0, "validation": 1, "test": 2}


def build_toy_tokenizer():
    """Word-level tokenizer with T5 conventions (<pad>=0, </s>=1 appended, <unk>=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = list(TOY_SPECIAL) + TOY_TOPIC_WORDS + TOY_FILLER_WORDS
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def save_toy_tokenizer(path: str) -> None:
    """Write the files AutoTokenizer.from_pretrained(path) reads, the same in
    transformers 4.x and 5.x (5.x no longer writes special_tokens_map.json itself)."""
    os.makedirs(path, exist_ok=True)
    build_toy_tokenizer().backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)


def _doc(rng) -> list[str]:
    k = int(rng.integers(2, 5))
    topics = list(rng.choice(TOY_TOPIC_WORDS, k, replace=False))
    words = topics + list(rng.choice(topics, int(rng.integers(0, k + 1))))  # repeats
    length = int(rng.integers(8, 17))
    words += list(rng.choice(TOY_FILLER_WORDS, length - len(words)))
    return [str(w) for w in rng.permutation(words)]


def toy_prompts(n: int, seed) -> list[str]:
    """n documents, a deterministic function of seed (an int or a list of ints)."""
    rng = np.random.default_rng(seed)
    return [" ".join(_doc(rng)) for _ in range(n)]


def toy_split(split: str, n: int, seed: int = 0) -> list[str]:
    """Prompts of a split; splits use disjoint random streams."""
    if split not in _SPLITS:
        fail(f"unknown split '{split}' for --dataset toy; use one of {list(_SPLITS)}")
    return toy_prompts(n, [_SPLITS[split], seed])


def toy_ideal_summary(prompt: str) -> str:
    return " ".join(dict.fromkeys(w for w in prompt.split() if w in _TOPIC))


def toy_reward(prompt: str, completion: str) -> float:
    """Oracle reward in [-1, 1]; the ideal summary, and only it, scores 1.

    R = coverage * (0.8 + 0.2 * order)
        - min(1, 0.25 #filler + 0.5 #off_document + 0.25 #repeat + 0.1 #excess_words)
    coverage = fraction of the document's topic words present; order = fraction of
    consecutive summary topic words in document order (1 if fewer than two);
    excess_words = words beyond the ideal summary's length.
    """
    doc, ideal = set(prompt.split()), toy_ideal_summary(prompt).split()
    rank = {w: i for i, w in enumerate(ideal)}
    seen, topics, filler, off, rep = set(), [], 0, 0, 0
    words = completion.split()
    for w in words:
        if w in seen:
            rep += 1
        elif w not in doc:
            off += 1  # hallucination: worse than filler
        elif w in rank:
            topics.append(rank[w])
        else:
            filler += 1
        seen.add(w)
    pairs = list(zip(topics, topics[1:]))
    order = sum(a < b for a, b in pairs) / len(pairs) if pairs else 1.0
    coverage = len(topics) / max(len(ideal), 1)
    excess = max(len(words) - len(ideal), 0)
    penalty = min(1.0, 0.25 * filler + 0.5 * off + 0.25 * rep + 0.1 * excess)
    return coverage * (0.8 + 0.2 * order) - penalty


def toy_rewards(prompts, completions) -> np.ndarray:
    return np.array([toy_reward(x, y) for x, y in zip(prompts, completions)], np.float32)


def _corrupt(prompt: str, rng) -> str:
    """A noisy demonstration: drop (0.15 a word), insert (0.2 per gap: filler from the
    document, off-document topic word, or repeat) and swap adjacent words (0.2)."""
    ideal = toy_ideal_summary(prompt).split()
    out = [w for w in ideal if rng.random() > 0.15] or ideal[:1]
    if len(out) > 1 and rng.random() < 0.2:
        i = int(rng.integers(len(out) - 1))
        out[i], out[i + 1] = out[i + 1], out[i]
    noisy, doc = [], prompt.split()
    for w in out + [None]:
        if rng.random() < 0.2:
            u = rng.random()
            pool = ([v for v in doc if v not in _TOPIC] or TOY_FILLER_WORDS if u < 0.5 else
                    [v for v in TOY_TOPIC_WORDS if v not in doc] if u < 0.75 else noisy or out)
            noisy.append(str(rng.choice(pool)))
        if w is not None:
            noisy.append(w)
    return " ".join(noisy)


def toy_sft_data(n: int, seed) -> list[dict]:
    """Noisy demonstrations {prompt, completion}: decent to imitate, clearly improvable
    (~22% equal the ideal summary; mean oracle p(ideal > demo) ~0.87)."""
    rng = np.random.default_rng(np.append(seed, 7))  # noise independent of the prompts
    return [{"prompt": x, "completion": _corrupt(x, rng)} for x in toy_prompts(n, seed)]


def toy_pairwise_data(prompts, sample_fn, seed: int, judge=None) -> list[dict]:
    """{prompt, chosen, rejected}: two pi_ref samples per prompt (mu = pi_ref, as for
    TL;DR), winner drawn from Bernoulli(p(y > y'|x)) of the oracle (or `judge`)."""
    ys, ys2 = list(sample_fn(prompts)), list(sample_fn(prompts))
    p = (judge or toy_judge())(prompts, ys, ys2)
    wins = np.random.default_rng(seed).random(len(p)) < p
    return [{"prompt": x, "chosen": a if w else b, "rejected": b if w else a}
            for x, a, b, w in zip(prompts, ys, ys2, wins)]


def normalise_rewards(records: list[dict]) -> list[dict]:
    """Rewards to mean 0 / variance 1 over the dataset (Richemond et al. 2024, Sec. 4)."""
    r = np.array([d["reward"] for d in records], np.float64)
    std = r.std() if r.size and r.std() > 0 else 1.0  # constant rewards: centre only
    return [{**d, "reward": float(v)} for d, v in zip(records, (r - r.mean()) / std)]


def toy_single_data(prompts, sample_fn, seed: int = 0) -> list[dict]:
    """{prompt, completion, reward}: one pi_ref sample per prompt, oracle reward
    normalised. (The oracle reward is deterministic, so seed is unused; kept for symmetry.)"""
    ys = list(sample_fn(prompts))
    r = toy_rewards(prompts, ys)
    return normalise_rewards([{"prompt": x, "completion": y, "reward": float(v)}
                              for x, y, v in zip(prompts, ys, r)])


# Local and hub data. Each kind has a plain schema (one JSON object per .jsonl line);
# the hub schemas named in the hints are recognised from their fields and normalised.
SCHEMAS = {
    "pairwise": '{"prompt", "chosen", "rejected"} or summarize_from_feedback '
                '{"info": {"post"}, "summaries": [{"text"}, {"text"}], "choice": 0|1}',
    "prompts": '{"prompt"} or xsum {"document"}',
    "single": '{"prompt", "completion", "reward": number} or UltraFeedback '
              '{"instruction", "completions": [{"response", "overall_score"}]}',
    "sft": '{"prompt", "completion"} or xsum {"document", "summary"}',
}
_TOY_SIZES = {"train": 2000, "validation": 256, "test": 256}


class _Bad(Exception):
    """A record that does not fit its schema: (field, problem); load_data adds where."""


def _text(rec, field):
    v = rec.get(field) if isinstance(rec, dict) else None
    if not isinstance(v, str) or not v.strip():
        raise _Bad(field, f"is missing or empty (got {v!r:.40})")
    return v


def _float(v) -> float:
    try:  # numeric strings count: UltraFeedback ratings are strings such as "4" or "N/A"
        return math.nan if isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return math.nan


def _number(rec, field):
    if not math.isfinite(_float(rec.get(field))):
        raise _Bad(field, f"is not a finite number (got {rec.get(field)!r:.40})")
    return _float(rec[field])


def _tldr_prompt(info):
    """summarize_from_feedback: the TL;DR prompt format of Stiennon et al. 2020."""
    if not isinstance(info, dict):
        raise _Bad("info", "is missing (expected an object with 'post')")
    post = _text({"info.post": info.get("post") or info.get("article")}, "info.post")
    if not info.get("title"):
        return post
    return f"SUBREDDIT: r/{info.get('subreddit') or ''}\nTITLE: {info['title']}\nPOST: {post}\nTL;DR:"


def _records(rec, kind, skipped):
    """One raw record -> a list of normalised records of `kind`."""
    if not isinstance(rec, dict):
        raise _Bad(None, "is not a JSON object")
    if kind == "pairwise":
        if "summaries" in rec and "chosen" not in rec:
            s, c = rec["summaries"], rec.get("choice")
            if not (isinstance(s, list) and len(s) == 2):
                raise _Bad("summaries", "must be a list of two {text} objects")
            if c not in (0, 1):
                raise _Bad("choice", f"must be 0 or 1 (got {c!r})")
            text = [_text(t if isinstance(t, dict) else {}, "text") for t in s]
            return [{"prompt": _tldr_prompt(rec.get("info")), "chosen": text[c],
                     "rejected": text[1 - c]}]
        return [{"prompt": _text(rec, "prompt"), "chosen": _text(rec, "chosen"),
                 "rejected": _text(rec, "rejected")}]
    if kind == "single":
        if "completions" in rec and "completion" not in rec:
            out, x = [], _text(rec, "instruction")
            if not isinstance(rec["completions"], list):
                raise _Bad("completions", "must be a list of {response, overall_score} objects")
            for c in rec["completions"]:
                c = c if isinstance(c, dict) else {}
                r = [_float(c.get(k)) for k in ("overall_score", "fine-grained_score")]
                r = [v for v in r if math.isfinite(v)]
                if r and isinstance(c.get("response"), str) and c["response"].strip():
                    out.append({"prompt": x, "completion": c["response"], "reward": r[0]})
                else:
                    skipped.append(1)  # UltraFeedback has unscored completions: counted, not hidden
            return out
        return [{"prompt": _text(rec, "prompt"), "completion": _text(rec, "completion"),
                 "reward": _number(rec, "reward")}]
    if kind == "sft" and "document" in rec and "prompt" not in rec:
        return [{"prompt": _text(rec, "document"), "completion": _text(rec, "summary")}]
    if kind == "sft":
        return [{"prompt": _text(rec, "prompt"), "completion": _text(rec, "completion")}]
    for field in ("prompt", "document", "instruction"):  # prompts from any schema
        if field in rec:
            return [{"prompt": _text(rec, field)}]
    if "info" in rec:
        return [{"prompt": _tldr_prompt(rec["info"])}]
    raise _Bad("prompt", "is missing")


def _normalise(rows, kind, n, where):
    """rows: (location, raw record) pairs. Stops at the first bad record."""
    out, skipped = [], []
    for loc, rec in rows:
        if n is not None and len(out) >= n:
            break
        try:
            out += _records(rec, kind, skipped)
        except _Bad as e:
            what = "the record" if e.args[0] is None else f"field '{e.args[0]}'"
            fail(f"{loc}: {what} {e.args[1]}; each record must be {SCHEMAS[kind]}")
    if skipped:
        print(f"{where}: skipped {len(skipped)} completions without a response or a numeric score")
    if not out:
        fail(f"{where}: no {kind} records; expected one JSON object per line: {SCHEMAS[kind]}")
    out = out[:n]
    return normalise_rewards(out) if kind == "single" else out


def _jsonl_rows(path):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) carry no record
            try:
                yield f"{path}", json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}, line {i}: not valid JSON ({e.msg}); write one JSON object per line")


def _hub_rows(name, split):
    """Rows of a Hugging Face dataset; `datasets` is optional, so imported here."""
    try:
        import datasets
    except ImportError:
        fail(f"'{name}' is not 'toy' nor a local file or folder, and loading it from the Hugging Face "
             f"hub needs `pip install datasets`; or pass a local .jsonl")
    path, _, config = name.partition(":")
    if path == "openai/summarize_from_feedback" and not config:
        config = "comparisons"
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as e:  # offline, unknown name, missing split: all end the same way
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        fail(f"could not load '{name}' (split '{split}') from the Hugging Face hub "
             f"({type(e).__name__}: {msg}); offline? pass a local .jsonl instead")
    return ((f"{name} [{split}] record {i}", r) for i, r in enumerate(ds, 1))


def load_data(dataset: str, kind: str, split: str = "train", n: int | None = None,
              seed: int = 0, sample_fn=None) -> list[dict]:
    """Records of `kind` (pairwise | prompts | single | sft) as plain dicts of str/float.

    dataset: "toy" (the embedded task), a .jsonl file, a folder holding <split>*.jsonl,
    or a Hugging Face dataset name ("name" or "name:config"; needs `datasets`).
    Toy pairwise/single data are drawn from pi_ref: pass sample_fn(prompts) -> completions.
    Single-trajectory rewards are normalised to mean 0 / variance 1 (Richemond et al. Sec. 4).
    n: the first n records (toy: n fresh ones); seed varies only the toy data.
    """
    if kind not in SCHEMAS:
        fail(f"unknown data kind '{kind}'; use one of {list(SCHEMAS)}")
    dataset = os.path.expanduser(dataset)
    if dataset == "toy":
        x = toy_split(split, _TOY_SIZES.get(split, 256) if n is None else n, seed)
        if kind == "prompts":
            return [{"prompt": p} for p in x]
        if kind == "sft":  # same prompts as toy_split, plus noisy demonstrations
            return toy_sft_data(len(x), [_SPLITS[split], seed])
        if sample_fn is None:
            fail(f"toy {kind} data are sampled from pi_ref: pass load_data(..., sample_fn=...)")
        return (toy_pairwise_data if kind == "pairwise" else toy_single_data)(x, sample_fn, seed)
    if os.path.isdir(dataset):
        files = sorted(glob.glob(os.path.join(dataset, f"{split}*.jsonl")))
        if not files:
            fail(f"{dataset}: no {split}*.jsonl in this folder; put the {split} split in {split}.jsonl")
        return _normalise((r for f in files for r in _jsonl_rows(f)), kind, n, dataset)
    if os.path.isfile(dataset):
        return _normalise(_jsonl_rows(dataset), kind, n, dataset)
    if dataset.endswith((".jsonl", ".json")) or dataset.startswith((".", "/")):
        fail(f"{dataset}: no such file or folder; use 'toy', a .jsonl file, a folder or a hub name")
    return _normalise(_hub_rows(dataset, split), kind, n, dataset)


def tokenize(tokenizer, texts, max_len: int):
    """-> (ids int32 [N, max_len], mask int32 [N, max_len], n_truncated).

    Right padding with the pad id (0 for T5). A text longer than max_len keeps its
    first max_len - 1 tokens and then EOS, so the model always sees where it ends.
    """
    if max_len < 2:
        fail(f"max length must be >= 2 (one token and EOS), got {max_len}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    ids = np.full((len(texts), max_len), pad, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    truncated = 0
    for i, seq in enumerate(tokenizer(list(texts))["input_ids"] if len(texts) else []):
        if not seq or seq[-1] != eos:
            seq = list(seq) + [eos]  # a tokenizer that does not append EOS itself
        if len(seq) > max_len:
            seq, truncated = list(seq[:max_len - 1]) + [eos], truncated + 1
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    return ids, mask, truncated
