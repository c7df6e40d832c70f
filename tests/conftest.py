"""Shared test fixtures: tiny Hugging Face T5 folders made locally (no network)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def save_word_tokenizer(folder, vocab_size):
    """A word-level tokenizer with T5's special ids (<pad>=0, </s>=1, <unk>=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_hf_t5(folder, *, gated, tied, vocab_size=48, d_model=32, layers=2, heads=4, d_ff=64, seed=0,
               shard=False):
    """Random transformers.T5ForConditionalGeneration saved to `folder`; returns the torch model.

    Layer norms and biases are perturbed away from their init so that a wrong mapping shows.
    An untied model gets its own lm_head.weight and tie_word_embeddings=False (Flan-T5 style).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                   num_heads=heads, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, feed_forward_proj="gated-gelu" if gated else "relu",
                   decoder_start_token_id=0, dropout_rate=0.0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    if not tied:
        path = os.path.join(folder, "model.safetensors")
        tensors = load_file(path)
        tensors["lm_head.weight"] = torch.randn(vocab_size, d_model)
        save_file(tensors, path, metadata={"format": "pt"})
        c = json.load(open(os.path.join(folder, "config.json")))
        c.update(tie_word_embeddings=False, scale_decoder_outputs=False)
        json.dump(c, open(os.path.join(folder, "config.json"), "w"))
    if shard:
        model = T5ForConditionalGeneration.from_pretrained(folder).eval()
        for f in os.listdir(folder):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(folder, f))
        model.save_pretrained(folder, max_shard_size="20KB")
    save_word_tokenizer(folder, vocab_size)
    return T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A random tiny Flan-style (gated-gelu, untied) T5 folder shared by many tests."""
    folder = str(tmp_path_factory.mktemp("tiny_t5"))
    make_hf_t5(folder, gated=True, tied=False)
    return folder
