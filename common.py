"""Everything the algorithm scripts share (and nothing else).

Contents (sections appear in this order):
  1. Model        T5 encoder-decoder in Flax NNX
  2. Checkpoints  load_t5 / save_t5 (Hugging Face folders and hub ids)
  3. Log-probs    teacher-forced per-token and per-sequence log-probs
  4. Sampling     one jitted, KV-cached sampler; geometric mixture of two models
  5. Preferences  judges (prompts, y, y') -> p(y > y' | x)
  6. Data         the embedded toy task; JSONL and hub datasets
  7. Sharding     ('data', 'fsdp') mesh over all devices
  8. Training     optimiser, logging, evaluation, resumable checkpoints
"""
from __future__ import annotations


def fail(msg: str):
    """Stop with one clear line on stderr and exit status 1 (no traceback wall)."""
    raise SystemExit(f"error: {msg}")

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32
NEG_INF = -1e9  # additive mask; finite so fully-masked (padding) rows stay NaN-free

# ---------------------------------------------------------------------------
# 1. Model: T5 encoder-decoder (Raffel et al. 2020) in Flax NNX
# ---------------------------------------------------------------------------
# Matches transformers' PyTorch T5 (original T5 and T5 v1.1 / Flan-T5) to 1e-4.
# Parameters are stored [in, out] (PyTorch Linear is [out, in]); the checkpoint
# code below transposes. Dropout is omitted: the papers fine-tune without it.

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": partial(jax.nn.gelu, approximate=True),  # "gated-gelu" = tanh-approximated gelu
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclass(frozen=True)
class T5Spec:
    """The architecture fields we use, read once from a transformers.T5Config."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float
    act: str  # key of ACTIVATIONS
    gated: bool  # T5 v1.1: wo(act(wi_0 x) * wi_1 x); original T5: wo(relu(wi x))
    tied: bool  # no lm_head: logits use the input embedding
    rescale: bool  # multiply the decoder output by d_model**-0.5 (original T5)
    pad_id: int
    eos_id: int
    start_id: int  # decoder_start_token_id (the pad token for T5)
    feed_forward_proj: str

    @staticmethod
    def from_config(cfg, where: str = "config") -> "T5Spec":
        if getattr(cfg, "model_type", "t5") != "t5":
            fail(f"{where}: model_type is '{cfg.model_type}', expected 't5'; pass a T5 checkpoint")
        proj = cfg.feed_forward_proj
        parts = proj.split("-")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if act not in ACTIVATIONS or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            fail(f"{where}: unknown feed_forward_proj '{proj}'; expected 'relu', 'gated-gelu' or "
                 f"'[gated-]{{{', '.join(ACTIVATIONS)}}}'")
        tie = bool(getattr(cfg, "tie_word_embeddings", True))
        # transformers >= 5 keeps the rescale decision in `scale_decoder_outputs`;
        # older versions used tie_word_embeddings for both (T5 v1.1 sets it False).
        rescale = bool(getattr(cfg, "scale_decoder_outputs", tie))
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        start = cfg.decoder_start_token_id
        return T5Spec(
            vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
            num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
            num_heads=cfg.num_heads, num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance, eps=cfg.layer_norm_epsilon,
            act=act, gated=parts[0] == "gated", tied=tie,  # load_t5 unties if lm_head.weight exists
            rescale=rescale, pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            eos_id=1 if eos is None else eos, start_id=cfg.pad_token_id if start is None else start,
            feed_forward_proj=proj,
        )


def _init(rngs, shape, std, dtype):
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype))


def rms_norm(x, weight, eps):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(F32)).astype(x.dtype)


def relative_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's log-spaced relative-position buckets; rel = key_pos - query_pos."""
    bucket = 0
    if bidirectional:  # half the buckets for keys to the right
        num_buckets //= 2
        bucket = (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:  # causal: only keys to the left exist
        rel = -jnp.minimum(rel, 0)
    exact = num_buckets // 2  # small distances get one bucket each
    log_ratio = jnp.log(jnp.maximum(rel, 1).astype(F32) / exact) / math.log(max_distance / exact)
    large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(rel < exact, rel, large)


class Attention(nnx.Module):
    """Multi-head attention without the 1/sqrt(d) scaling (T5 folds it into init)."""

    def __init__(self, s: T5Spec, *, relative_bias: bool, dtype, rngs):
        inner = s.num_heads * s.d_kv
        # transformers' T5 initialisation, so random models look like real ones
        self.q = _init(rngs, (s.d_model, inner), (s.d_model * s.d_kv) ** -0.5, dtype)
        self.k = _init(rngs, (s.d_model, inner), s.d_model**-0.5, dtype)
        self.v = _init(rngs, (s.d_model, inner), s.d_model**-0.5, dtype)
        self.o = _init(rngs, (inner, s.d_model), inner**-0.5, dtype)
        self.bias = _init(rngs, (s.num_buckets, s.num_heads), s.d_model**-0.5, dtype) if relative_bias else None
        self.heads = s.num_heads

    def project(self, x, w):  # [B, T, D] -> [B, T, H, dk]
        y = x @ w[...]
        return y.reshape(*y.shape[:-1], self.heads, -1)

    def __call__(self, q, k, v, bias):
        """q: [B, Tq, H, dk]; k, v: [B, Tk, H, dk]; bias: additive [B|1, H|1, Tq, Tk] in fp32."""
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(*out.shape[:2], -1) @ self.o[...]


class Block(nnx.Module):
    """One encoder (self-attn, FF) or decoder (self-attn, cross-attn, FF) layer, pre-norm."""

    def __init__(self, s: T5Spec, *, decoder: bool, relative_bias: bool, dtype, rngs):
        ones = lambda: nnx.Param(jnp.ones((s.d_model,), dtype))
        self.self_norm, self.self_attn = ones(), Attention(s, relative_bias=relative_bias, dtype=dtype, rngs=rngs)
        if decoder:
            self.cross_norm, self.cross_attn = ones(), Attention(s, relative_bias=False, dtype=dtype, rngs=rngs)
        self.ff_norm = ones()
        self.wi = _init(rngs, (s.d_model, s.d_ff), s.d_model**-0.5, dtype)
        self.wi_gate = _init(rngs, (s.d_model, s.d_ff), s.d_model**-0.5, dtype) if s.gated else None
        self.wo = _init(rngs, (s.d_ff, s.d_model), s.d_ff**-0.5, dtype)
        self.eps, self.act = s.eps, ACTIVATIONS[s.act]

    def feed_forward(self, x):
        h = rms_norm(x, self.ff_norm[...], self.eps)
        if self.wi_gate is not None:  # gated: act(wi_0 h) * (wi_1 h); here wi = wi_0, wi_gate = wi_1
            u = self.act(h @ self.wi[...]) * (h @ self.wi_gate[...])
        else:
            u = self.act(h @ self.wi[...])
        return x + u @ self.wo[...]

    def self_attention(self, x, bias, cache=None, t=None):
        """Full-sequence self-attention, or one decoding step against a KV cache at position t."""
        a = self.self_attn
        h = rms_norm(x, self.self_norm[...], self.eps)
        q, k, v = a.project(h, a.q), a.project(h, a.k), a.project(h, a.v)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), t, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), t, axis=1)
            cache = (k, v)
        return x + a(q, k, v, bias), cache

    def cross_attention(self, x, enc_kv, bias):
        a = self.cross_attn
        h = rms_norm(x, self.cross_norm[...], self.eps)
        return x + a(a.project(h, a.q), *enc_kv, bias)


class T5(nnx.Module):
    """T5 encoder-decoder. Call: model(input_ids, attention_mask, decoder_input_ids) -> fp32 logits."""

    def __init__(self, config, *, dtype=F32, rngs: nnx.Rngs):
        s = self.spec = config if isinstance(config, T5Spec) else T5Spec.from_config(config)
        self.shared = _init(rngs, (s.vocab_size, s.d_model), 1.0, dtype)
        block = lambda i, dec: Block(s, decoder=dec, relative_bias=i == 0, dtype=dtype, rngs=rngs)
        self.encoder = nnx.List([block(i, False) for i in range(s.num_layers)])
        self.decoder = nnx.List([block(i, True) for i in range(s.num_decoder_layers)])
        self.encoder_norm = nnx.Param(jnp.ones((s.d_model,), dtype))
        self.decoder_norm = nnx.Param(jnp.ones((s.d_model,), dtype))
        self.lm_head = None if s.tied else _init(rngs, (s.d_model, s.vocab_size), 1.0, dtype)

    # -- pieces shared by training (full sequences) and sampling (one token at a time) --
    def position_bias(self, block, q_pos, k_pos, bidirectional):
        """Relative position bias [1, H, Tq, Tk] (fp32) from the first layer's table."""
        s = self.spec
        buckets = relative_bucket(k_pos[None, :] - q_pos[:, None], bidirectional, s.num_buckets, s.max_distance)
        return block.self_attn.bias[...].astype(F32)[buckets].transpose(2, 0, 1)[None]

    def embed(self, ids):
        return self.shared[...][ids]

    def encode(self, input_ids, attention_mask):
        """Encoder hidden states [B, S, D]; padding keys masked, bias shared by all layers."""
        s_len = input_ids.shape[1]
        pos = jnp.arange(s_len)
        bias = self.position_bias(self.encoder[0], pos, pos, True)
        bias = bias + jnp.where(attention_mask[:, None, None, :] > 0, 0.0, NEG_INF)
        x = self.embed(input_ids)
        for blk in self.encoder:
            x, _ = blk.self_attention(x, bias)
            x = blk.feed_forward(x)
        return rms_norm(x, self.encoder_norm[...], self.spec.eps)

    def cross_kv(self, enc):
        """Cross-attention keys/values of every decoder layer: computed once per prompt."""
        return [(b.cross_attn.project(enc, b.cross_attn.k), b.cross_attn.project(enc, b.cross_attn.v))
                for b in self.decoder]

    def logits(self, h):
        h = rms_norm(h, self.decoder_norm[...], self.spec.eps)
        if self.spec.rescale:  # original T5 rescales before the tied projection
            h = h * self.spec.d_model**-0.5
        w = self.shared[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=F32)

    def decode(self, decoder_input_ids, enc_kv, attention_mask, decoder_attention_mask=None):
        """Teacher-forced decoder: hidden states [B, T, D] (causal self-attention)."""
        t_len = decoder_input_ids.shape[1]
        pos = jnp.arange(t_len)
        bias = self.position_bias(self.decoder[0], pos, pos, False)
        keep = (pos[None, :] <= pos[:, None])[None]  # causal, [1, T, T]
        if decoder_attention_mask is not None:
            keep = keep & (decoder_attention_mask[:, None, :] > 0)
        bias = bias + jnp.where(keep, 0.0, NEG_INF)[:, None]
        cross_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, NEG_INF)
        x = self.embed(decoder_input_ids)
        for blk, kv in zip(self.decoder, enc_kv):
            x, _ = blk.self_attention(x, bias)
            x = blk.cross_attention(x, kv, cross_bias)
            x = blk.feed_forward(x)
        return x

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
        enc = self.encode(input_ids, attention_mask)
        h = self.decode(decoder_input_ids, self.cross_kv(enc), attention_mask, decoder_attention_mask)
        return self.logits(h)

    # -- incremental decoding with a fixed-size KV cache (used by `sample`) --
    def start_decoding(self, input_ids, attention_mask, max_len):
        """Encode once; precompute cross K/V; allocate the self-attention cache."""
        enc = self.encode(input_ids, attention_mask)
        b, s = input_ids.shape[0], self.spec
        zeros = jnp.zeros((b, max_len, s.num_heads, s.d_kv), enc.dtype)
        return dict(cross=self.cross_kv(enc), cache=[(zeros, zeros) for _ in self.decoder],
                    cross_bias=jnp.where(attention_mask[:, None, None, :] > 0, 0.0, NEG_INF))

    def decode_step(self, token, t, state):
        """Logits [B, V] for position t given the previous token [B]; returns the updated state."""
        max_len = state["cache"][0][0].shape[1]
        k_pos = jnp.arange(max_len)
        bias = self.position_bias(self.decoder[0], t[None], k_pos, False)
        bias = bias + jnp.where(k_pos <= t, 0.0, NEG_INF)  # causal, and hides unwritten slots
        x = self.embed(token[:, None])
        caches = []
        for blk, kv, cache in zip(self.decoder, state["cross"], state["cache"]):
            x, cache = blk.self_attention(x, bias, cache, t)
            x = blk.cross_attention(x, kv, state["cross_bias"])
            x = blk.feed_forward(x)
            caches.append(cache)
        return self.logits(x[:, 0]), dict(state, cache=caches)


# ---------------------------------------------------------------------------
# 2. Checkpoints: Hugging Face folders and hub ids, no PyTorch needed
# ---------------------------------------------------------------------------
def _hf_names(model: T5):
    """(hf_name, nnx.Param, transpose) for every parameter; one table for load and save."""
    out = [("shared.weight", model.shared, False)]
    if model.lm_head is not None:
        out.append(("lm_head.weight", model.lm_head, True))
    for stack, blocks, norm in (("encoder", model.encoder, model.encoder_norm),
                                ("decoder", model.decoder, model.decoder_norm)):
        out.append((f"{stack}.final_layer_norm.weight", norm, False))
        for i, b in enumerate(blocks):
            p = f"{stack}.block.{i}.layer"
            attns = [("0.SelfAttention", b.self_attn, b.self_norm)]
            if stack == "decoder":
                attns.append(("1.EncDecAttention", b.cross_attn, b.cross_norm))
            for name, a, n in attns:
                out += [(f"{p}.{name}.{w}.weight", getattr(a, w), True) for w in "qkvo"]
                out.append((f"{p}.{name[0]}.layer_norm.weight", n, False))
                if a.bias is not None:
                    out.append((f"{p}.{name}.relative_attention_bias.weight", a.bias, False))
            ff = f"{p}.{len(attns)}"
            out.append((f"{ff}.layer_norm.weight", b.ff_norm, False))
            out.append((f"{ff}.DenseReluDense.wo.weight", b.wo, True))
            if b.wi_gate is None:
                out.append((f"{ff}.DenseReluDense.wi.weight", b.wi, True))
            else:
                out += [(f"{ff}.DenseReluDense.wi_0.weight", b.wi, True),
                        (f"{ff}.DenseReluDense.wi_1.weight", b.wi_gate, True)]
    return out


_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]


def _resolve(name_or_path: str) -> str:
    """A local folder as is; otherwise download (or reuse the cache of) a hub repo."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        fail(f"{name_or_path}: not a folder; pass a folder with config.json and model.safetensors "
             "or a Hugging Face hub id such as google/flan-t5-small")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_path, allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, unknown repo, gated repo, ...
        fail(f"could not fetch '{name_or_path}' from the Hugging Face hub ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:120]}); check the id and the network, or pass a local folder")


def _read_tensors(folder: str) -> tuple[dict, str]:
    """All tensors of model.safetensors or a sharded model.safetensors.index.json."""
    from safetensors import safe_open

    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        try:
            files = sorted({os.path.join(folder, f) for f in json.load(open(index))["weight_map"].values()})
        except (ValueError, KeyError) as e:
            fail(f"{index}: malformed index ({e}); expected a 'weight_map' of tensor -> file")
    else:
        fail(f"{folder}: no model.safetensors or model.safetensors.index.json "
             "(PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)")
    tensors = {}
    for f in files:
        try:
            with safe_open(f, framework="flax") as h:  # flax framework keeps bfloat16 as is
                tensors.update({k: (h.get_tensor(k), f) for k in h.keys()})
        except Exception as e:
            fail(f"{f}: cannot read safetensors ({e})")
    return tensors, files[0]


def load_t5(name_or_path: str, dtype=F32) -> tuple[T5, "PreTrainedTokenizerBase"]:
    """Load (model, tokenizer) from a hub id or a local Hugging Face folder.

    Accepts the tied-embedding variants (shared / encoder.embed_tokens /
    decoder.embed_tokens) and unties the output layer when lm_head.weight exists.
    """
    from transformers import AutoTokenizer, T5Config

    folder = _resolve(name_or_path)
    cfg_file = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_file):
        fail(f"{cfg_file}: missing; a T5 folder needs config.json next to model.safetensors")
    try:
        raw = json.load(open(cfg_file))
        if raw.get("model_type") != "t5":
            fail(f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 't5'; pass a T5 checkpoint")
        spec = T5Spec.from_config(T5Config.from_pretrained(folder), cfg_file)
    except SystemExit:
        raise
    except Exception as e:
        fail(f"{cfg_file}: malformed config ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    tensors, where = _read_tensors(folder)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if "shared.weight" not in tensors and alias in tensors:
            tensors["shared.weight"] = tensors[alias]
    spec = replace(spec, tied="lm_head.weight" not in tensors)
    model = nnx.eval_shape(lambda: T5(spec, dtype=dtype, rngs=nnx.Rngs(0)))  # no wasted random init
    for name, param, transpose in _hf_names(model):
        if name not in tensors:
            fail(f"{where}: tensor '{name}' is missing; is this a complete T5 checkpoint?")
        value, file = tensors[name]
        value = value.T if transpose else value
        if value.shape != param.shape:
            fail(f"{file}: tensor '{name}' has shape {tuple(value.shape)}, expected {param.shape} from config.json")
        param.set_value(jnp.asarray(value, dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        fail(f"{folder}: cannot load a tokenizer ({type(e).__name__}); copy tokenizer.json or spiece.model "
             "and their configs from the base model into this folder")
    return model, tokenizer


def save_t5(model: T5, tokenizer, path: str) -> None:
    """Write a folder that transformers.T5ForConditionalGeneration.from_pretrained loads
    to the same logits. Written to a temporary folder first, then moved into place."""
    from safetensors.flax import save_file

    s = model.spec
    dtype = str(model.shared[...].dtype)
    config = dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=s.vocab_size,
        d_model=s.d_model, d_kv=s.d_kv, d_ff=s.d_ff, num_layers=s.num_layers,
        num_decoder_layers=s.num_decoder_layers, num_heads=s.num_heads,
        relative_attention_num_buckets=s.num_buckets, relative_attention_max_distance=s.max_distance,
        layer_norm_epsilon=s.eps, feed_forward_proj=s.feed_forward_proj, dropout_rate=0.0,
        tie_word_embeddings=s.tied, scale_decoder_outputs=s.rescale, is_encoder_decoder=True,
        pad_token_id=s.pad_id, eos_token_id=s.eos_id, decoder_start_token_id=s.start_id, dtype=dtype,
    )
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {n: jnp.asarray(p[...].T if t else p[...]) for n, p, t in _hf_names(model)}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# 3. Log-probs: teacher forcing, fp32
# ---------------------------------------------------------------------------
def shift_right(ids, start_id):
    """Decoder inputs: [start, y_0, ..., y_{T-2}] (Hugging Face's convention)."""
    return jnp.concatenate([jnp.full_like(ids[:, :1], start_id), ids[:, :-1]], axis=1)


@nnx.jit
def token_logps(model: T5, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """log pi(y_t | x, y_<t) for every completion token [B, T]; zero at padding."""
    logits = model(prompt_ids, prompt_mask, shift_right(completion_ids, model.spec.start_id))
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    picked = jnp.take_along_axis(logp, completion_ids[..., None], axis=-1)[..., 0]
    return picked * completion_mask


@nnx.jit
def sequence_logps(model: T5, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """log pi(y | x): the sum of token log-probs over the completion (the papers' convention) [B]."""
    return token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask).sum(-1)


# ---------------------------------------------------------------------------
# 4. Sampling: KV-cached, jitted, optionally from the geometric mixture of two models
# ---------------------------------------------------------------------------
def _filter_logits(logits, top_k: int, top_p):
    """Keep the top-k tokens and the smallest set with probability >= top_p (nucleus)."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # the threshold is the logit of the last token needed to reach top_p
    n_keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(n_keep - 1, 0), axis=-1)
    return jnp.where(logits < cutoff, NEG_INF, logits)


@partial(nnx.jit, static_argnames=("max_new_tokens", "top_k", "greedy"))
def _sample(policy, ref, prompt_ids, prompt_mask, key, beta, temperature, top_p, *, max_new_tokens, top_k, greedy):
    b = prompt_ids.shape[0]
    models = [policy] if ref is None else [policy, ref]
    states = [m.start_decoding(prompt_ids, prompt_mask, max_new_tokens) for m in models]
    eos, pad = policy.spec.eos_id, policy.spec.pad_id

    def body(carry):
        t, token, done, states, key, ids, logps = carry
        outs = [m.decode_step(token, t, st) for m, st in zip(models, states)]
        logits = jax.nn.log_softmax(outs[0][0], axis=-1)
        if ref is not None:
            # Calandriello et al. 2024, Sec. 6: one-step-at-a-time mixture
            # log pi_hat_beta = (1 - beta) log pi_theta + beta log pi_ref + C
            logits = (1.0 - beta) * logits + beta * jax.nn.log_softmax(outs[1][0], axis=-1)
        key, sub = jax.random.split(key)
        if greedy:
            logp = jax.nn.log_softmax(logits, axis=-1)
            token = jnp.argmax(logits, axis=-1)
        else:
            logp = jax.nn.log_softmax(_filter_logits(logits / temperature, top_k, top_p), axis=-1)
            token = jax.random.categorical(sub, logp, axis=-1)
        token = jnp.where(done, pad, token).astype(jnp.int32)
        lp = jnp.where(done, 0.0, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0])
        ids, logps = ids.at[:, t].set(token), logps.at[:, t].set(lp)
        return t + 1, token, done | (token == eos), [o[1] for o in outs], key, ids, logps

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[2])

    init = (jnp.int32(0), jnp.full((b,), policy.spec.start_id, jnp.int32), jnp.zeros((b,), bool), states,
            key, jnp.full((b, max_new_tokens), pad, jnp.int32), jnp.zeros((b, max_new_tokens), F32))
    _, _, _, _, _, ids, logps = jax.lax.while_loop(cond, body, init)
    # a token is real if no EOS came strictly before it (so the EOS itself counts)
    is_eos = (ids == eos).astype(jnp.int32)
    mask = (jnp.cumsum(is_eos, axis=1) - is_eos == 0).astype(jnp.int32)
    return ids, mask, logps


def sample(policy: T5, prompt_ids, prompt_mask, key, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, ref: T5 | None = None, beta: float = 0.0):
    """Sample completions: returns (ids [B, T], mask [B, T], per-token log-probs [B, T]).

    The log-probs are under the distribution actually sampled from (after temperature,
    top-k/top-p and mixing). Stops when every row has produced EOS; pads after EOS.
    temperature=0 decodes greedily. With `ref`, samples from the token-wise geometric
    mixture softmax((1 - beta) log pi + beta log pi_ref): beta=0 is pi, beta=1 is pi_ref.
    """
    if not 0.0 <= beta <= 1.0:
        fail(f"beta={beta} must be in [0, 1] (the mixture weight of the reference model)")
    return _sample(policy, ref, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), key, jnp.float32(beta),
                   jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, top_k=top_k, greedy=temperature == 0)
