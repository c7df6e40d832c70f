"""Our NNX T5 against transformers' PyTorch T5 (the independent reference)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import common as C
from conftest import make_hf_t5
from flax import nnx

forward = nnx.jit(lambda m, *args: m(*args))  # jitted: eager op-by-op dispatch is slow

CONFIGS = {  # (gated feed-forward, tied embeddings)
    "t5-relu-tied": (False, True),
    "t5-relu-untied": (False, False),
    "flan-gated-tied": (True, True),
    "flan-gated-untied": (True, False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    gated, tied = CONFIGS[request.param]
    folder = str(tmp_path_factory.mktemp(request.param))
    ref = make_hf_t5(folder, gated=gated, tied=tied, shard=request.param == "flan-gated-untied")
    model, tok = C.load_t5(folder)
    return ref, model, tok, folder


def padded_batch(seed=0, b=3, s=7, t=6, vocab=48):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    mask[1, 4:] = 0  # padded prompts
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    dec = rng.integers(3, vocab, (b, t)).astype(np.int32)
    dec[:, 0] = 0  # decoder_start_token_id
    dmask = np.ones((b, t), np.int32)
    dmask[0, 4:] = 0
    dec[dmask == 0] = 0
    return ids, mask, dec, dmask


def torch_logits(ref, ids, mask, dec, dmask=None):
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                  decoder_attention_mask=None if dmask is None else torch.tensor(dmask))
    return out.logits.numpy()


def test_logits_match_pytorch(pair):
    ref, model, _, _ = pair
    ids, mask, dec, dmask = padded_batch()
    ours = np.asarray(forward(model, ids, mask, dec, dmask))
    theirs = torch_logits(ref, ids, mask, dec, dmask)
    assert ours.shape == theirs.shape
    valid = dmask.astype(bool)
    assert np.abs(ours - theirs)[valid].max() <= 1e-4
    assert np.abs(theirs).max() > 0.1  # not trivially zero
    # without a decoder mask (what the log-prob code uses), valid positions are unchanged
    ours_nomask = np.asarray(forward(model, ids, mask, dec))
    assert np.abs(ours_nomask - theirs)[valid].max() <= 1e-4


def test_several_completions_per_prompt_match_tiled_prompts(pair):
    """n decoder rows per prompt (row i + k * B belongs to prompt i) encode each prompt once:
    the logits are PyTorch's for the tiled prompts, and the gradient is that of the tiled call."""
    ref, model, _, _ = pair
    ids, mask, dec, dmask = padded_batch(seed=5)
    _, _, dec2, dmask2 = padded_batch(seed=6)
    decs, dmasks = np.concatenate([dec, dec2]), np.concatenate([dmask, dmask2])
    tiled = np.concatenate([ids, ids]), np.concatenate([mask, mask])
    ours = np.asarray(forward(model, ids, mask, decs, dmasks))
    theirs = torch_logits(ref, *tiled, decs, dmasks)
    assert np.abs(ours - theirs)[dmasks.astype(bool)].max() <= 1e-4

    y = decs[:, 1:]
    loss = lambda m, x, xm: C.sequence_logps(m, x, xm, y, dmasks[:, 1:]).sum()
    shared = nnx.grad(loss)(model, ids, mask)
    full = nnx.grad(loss)(model, *tiled)
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), shared, full)
    assert max(jax.tree.leaves(diff)) <= 1e-4
    assert float(jnp.abs(shared.encoder[0].wi[...]).max()) > 1e-3  # the encoder does get a gradient

    with pytest.raises(ValueError, match="whole number of completions per prompt"):
        forward(model, ids, mask, decs[:4], dmasks[:4])


def test_untied_model_has_lm_head(pair):
    ref, model, _, _ = pair
    assert (model.lm_head is None) == (ref.lm_head.weight.data_ptr() == ref.shared.weight.data_ptr())


def test_save_t5_loads_in_pytorch_to_same_logits(pair, tmp_path):
    from transformers import T5ForConditionalGeneration

    ref, model, tok, _ = pair
    C.save_t5(model, tok, str(tmp_path / "saved"))
    reloaded = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "saved")).eval()
    ids, mask, dec, _ = padded_batch(seed=1)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask, dec), torch_logits(ref, ids, mask, dec), atol=1e-5)
    again, _ = C.load_t5(str(tmp_path / "saved"))
    np.testing.assert_allclose(np.asarray(forward(again, ids, mask, dec)), np.asarray(forward(model, ids, mask, dec)), atol=1e-6)
    # transformers 4.x has no "TokenizersBackend" (what 5.x writes for a tokenizer.json tokenizer)
    config = json.load(open(tmp_path / "saved" / "tokenizer_config.json"))
    assert config.get("tokenizer_class", "PreTrainedTokenizerFast") != "TokenizersBackend"


def test_sequence_logps_match_pytorch(pair):
    ref, model, _, _ = pair
    ids, mask, _, _ = padded_batch(seed=2)
    y = np.array([[5, 9, 1, 0, 0], [7, 8, 11, 12, 1], [4, 1, 0, 0, 0]], np.int32)  # EOS=1 then padding
    ymask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.int32)
    ours = np.asarray(C.sequence_logps(model, ids, mask, y, ymask))
    dec = np.concatenate([np.zeros((3, 1), np.int32), y[:, :-1]], 1)
    logp = torch.log_softmax(torch.tensor(torch_logits(ref, ids, mask, dec)), -1).numpy()
    theirs = (np.take_along_axis(logp, y[..., None], -1)[..., 0] * ymask).sum(-1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_sampler_logps_equal_teacher_forced(pair):
    _, model, _, _ = pair
    ids, mask, _, _ = padded_batch(seed=3)
    y, ymask, logps = C.sample(model, ids, mask, jax.random.key(0), max_new_tokens=8)
    assert y.shape == (3, 8) and logps.shape == (3, 8)
    forced = C.token_logps(model, ids, mask, y, ymask)
    np.testing.assert_allclose(np.asarray(logps * ymask), np.asarray(forced), atol=1e-4)
    assert np.all(np.asarray(logps)[np.asarray(ymask) == 0] == 0)


def test_greedy_equals_pytorch_generate(pair):
    ref, model, _, _ = pair
    ids, mask, _, _ = padded_batch(seed=4)
    y, ymask, _ = C.sample(model, ids, mask, jax.random.key(0), max_new_tokens=10, temperature=0.0)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           do_sample=False, max_new_tokens=10, min_new_tokens=0).numpy()[:, 1:]  # drop start
    y, ymask = np.asarray(y), np.asarray(ymask).astype(bool)
    width = out.shape[1]
    np.testing.assert_array_equal(np.where(ymask, y, 0)[:, :width], np.where(ymask[:, :width], out, 0))


def test_sampling_stops_at_eos_and_pads_after():
    # a model whose decoder always prefers EOS after the first token: force it by biasing lm logits
    from transformers import T5Config
    from flax import nnx

    cfg = T5Config(vocab_size=16, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = C.T5(cfg, rngs=nnx.Rngs(0))
    emb = model.shared[...]
    model.shared.set_value(emb.at[1].set(emb[1] * 0 + 50.0 * jnp.sign(emb.mean(0))))
    ids = np.full((4, 5), 3, np.int32)
    y, ymask, _ = C.sample(model, ids, np.ones_like(ids), jax.random.key(1), max_new_tokens=6)
    y, ymask = np.asarray(y), np.asarray(ymask)
    for row, m in zip(y, ymask):
        n = m.sum()
        if (row == 1).any():
            first = int(np.argmax(row == 1))
            assert n == first + 1 and np.all(row[first + 1:] == 0)


def test_num_samples_equals_sampling_tiled_prompts(pair):
    """n draws per prompt from one encoding = the draws from the prompts tiled n times (the
    online scripts' two completions per prompt), mixture included; and the draws differ."""
    _, model, _, _ = pair
    ids, mask, _, _ = padded_batch(seed=4)
    key = jax.random.key(7)
    for ref in (None, model):
        kw = dict(ref=ref, beta=0.25) if ref is not None else {}
        got = C.sample(model, ids, mask, key, 6, num_samples=2, **kw)
        want = C.sample(model, np.concatenate([ids, ids]), np.concatenate([mask, mask]), key, 6, **kw)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert got[0].shape[0] == 2 * len(ids) and not np.array_equal(got[0][:len(ids)], got[0][len(ids):])


def test_mixture_first_step_is_the_analytic_mixture(tmp_path):
    """Calandriello et al. 2024 Sec. 6: softmax((1-beta) log pi + beta log pi_ref)."""
    make_hf_t5(str(tmp_path / "a"), gated=True, tied=False, vocab_size=12, seed=1)
    make_hf_t5(str(tmp_path / "b"), gated=True, tied=False, vocab_size=12, seed=2)
    pol, _ = C.load_t5(str(tmp_path / "a"))
    ref, _ = C.load_t5(str(tmp_path / "b"))
    n, beta = 6000, 0.3
    ids = np.tile(np.array([[5, 6, 7, 8]], np.int32), (n, 1))
    mask = np.ones_like(ids)
    start = np.zeros((1, 1), np.int32)
    lp = jax.nn.log_softmax(forward(pol, ids[:1], mask[:1], start)[0, 0])
    lr = jax.nn.log_softmax(forward(ref, ids[:1], mask[:1], start)[0, 0])
    mix = np.asarray(jax.nn.log_softmax((1 - beta) * lp + beta * lr))
    y, _, logps = C.sample(pol, ids, mask, jax.random.key(0), max_new_tokens=1, ref=ref, beta=beta)
    y, logps = np.asarray(y[:, 0]), np.asarray(logps[:, 0])
    np.testing.assert_allclose(logps, mix[y], atol=1e-5)  # exact: reported log-prob = mixture log-prob
    freq = np.bincount(y, minlength=12) / n
    p = np.exp(mix)
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3)
    # and the mixture is really a mixture: far from both endpoints
    assert np.abs(np.exp(lp) - p).max() > 0.02 and np.abs(np.exp(lr) - p).max() > 0.02
    # beta=0 is the policy, beta=1 the reference
    for b, target in ((0.0, lp), (1.0, lr)):
        _, _, l0 = C.sample(pol, ids[:64], mask[:64], jax.random.key(1), max_new_tokens=1, ref=ref, beta=b)
        y0, _, _ = C.sample(pol, ids[:64], mask[:64], jax.random.key(1), max_new_tokens=1, ref=ref, beta=b)
        np.testing.assert_allclose(np.asarray(l0[:, 0]), np.asarray(target)[np.asarray(y0[:, 0])], atol=1e-5)


@pytest.mark.parametrize("block", [128, 4, 3])
def test_categorical_draws_follow_the_softmax_and_skip_zero_probabilities(block):
    """The sampler's two-level inverse-CDF draw (one uniform per row) against exact probabilities:
    one padded block (128), and blocks of 4 and 3 where a whole block and the entries at block
    edges and at the vocabulary's end have probability 0; the returned log-prob is log_softmax's."""
    neg = C.NEG_INF
    logits = np.array([2.0, neg, 0.5, neg, neg, neg, neg, neg, 1.0, 0.0, -1.0, neg], np.float32)
    n = 40000
    tokens, logps = C._categorical(jax.random.key(3), jnp.tile(jnp.asarray(logits), (n, 1)), block)
    tokens, logps = np.asarray(tokens), np.asarray(logps)
    want = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    np.testing.assert_allclose(logps, want[tokens], atol=1e-6)
    freq = np.bincount(tokens, minlength=len(logits)) / n
    p = np.exp(want)
    assert len(freq) == len(logits) and freq[logits == neg].sum() == 0  # probability 0: never
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-4)


def test_bfloat16_parameters(pair):
    ref, model, _, folder = pair
    m16, _ = C.load_t5(folder, dtype=jnp.bfloat16)
    assert m16.shared[...].dtype == jnp.bfloat16
    ids, mask, dec, _ = padded_batch()
    out = forward(m16, ids, mask, dec)
    assert out.dtype == jnp.float32  # logits always fp32
    theirs = torch_logits(ref, ids, mask, dec)
    assert np.abs(np.asarray(out) - theirs).max() <= 0.03 * np.abs(theirs).max()  # bf16 has 8 mantissa bits


# ----- bad checkpoints: one clear error naming the file and the tensor or field -----
@pytest.fixture()
def broken(tiny_t5_dir, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_t5_dir, folder)
    return folder


def test_missing_config(broken):
    os.remove(broken / "config.json")
    with pytest.raises(SystemExit, match=r"config\.json: missing"):
        C.load_t5(str(broken))


def test_malformed_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"config\.json"):
        C.load_t5(str(broken))


def test_not_t5(broken):
    c = json.loads((broken / "config.json").read_text())
    c["model_type"] = "bert"
    (broken / "config.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match=r"config\.json: model_type is 'bert'"):
        C.load_t5(str(broken))


def test_unknown_feed_forward(broken):
    c = json.loads((broken / "config.json").read_text())
    c["feed_forward_proj"] = "gated-mystery"
    (broken / "config.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match=r"(?i)config\.json.*feed_forward_proj"):
        C.load_t5(str(broken))


def _rewrite(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = str(folder / "model.safetensors")
    t = load_file(path)
    edit(t)
    save_file(t, path)


def test_missing_tensor(broken):
    _rewrite(broken, lambda t: t.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"))
    with pytest.raises(SystemExit, match=r"model\.safetensors: tensor 'decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight' is missing"):
        C.load_t5(str(broken))


def test_misshaped_tensor(broken):
    def edit(t):
        t["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((3, 3), np.float32)

    _rewrite(broken, edit)
    with pytest.raises(SystemExit, match=r"model\.safetensors: tensor 'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight' has shape \(3, 3\)"):
        C.load_t5(str(broken))


def test_embedding_name_variant(broken, tiny_t5_dir):
    _rewrite(broken, lambda t: t.__setitem__("encoder.embed_tokens.weight", t.pop("shared.weight")))
    a, _ = C.load_t5(str(broken))
    b, _ = C.load_t5(tiny_t5_dir)
    np.testing.assert_array_equal(np.asarray(a.shared[...]), np.asarray(b.shared[...]))


def test_unreachable_hub_id_suggests_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="local folder"):
        C.load_t5("nobody-has/this-model-xyz")


def test_not_a_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit, match="not a folder"):
        C.load_t5(str(tmp_path / "file.txt"))


def test_top_k_and_top_p_restrict_and_renormalise(tiny_t5_dir):
    model, _ = C.load_t5(tiny_t5_dir)
    ids = np.tile(np.array([[5, 6, 7]], np.int32), (256, 1))
    mask = np.ones_like(ids)
    full = np.asarray(jax.nn.log_softmax(forward(model, ids[:1], mask[:1], np.zeros((1, 1), np.int32))[0, 0]))
    order = np.argsort(-full)
    y, _, lp = C.sample(model, ids, mask, jax.random.key(0), max_new_tokens=1, top_k=3)
    top3 = order[:3]
    assert set(np.asarray(y[:, 0]).tolist()) <= set(top3.tolist())
    renorm = full[top3] - np.log(np.exp(full[top3]).sum())
    np.testing.assert_allclose(np.asarray(lp[:, 0]), [renorm[list(top3).index(t)] for t in np.asarray(y[:, 0])], atol=1e-5)
    p_sorted = np.exp(full[order])
    n_nucleus = int(np.searchsorted(np.cumsum(p_sorted), 0.5) + 1)  # smallest set with mass >= 0.5
    y, _, _ = C.sample(model, ids, mask, jax.random.key(1), max_new_tokens=1, top_p=0.5)
    assert set(np.asarray(y[:, 0]).tolist()) <= set(order[:n_nucleus].tolist())
