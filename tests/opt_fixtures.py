"""Tiny synthetic OPT checkpoints and tokenizers for the foundation tests.

Everything is made in the test run (random weights, a tokenizer trained on a few invented
sentences): no data files are committed. transformers makes the reference checkpoints with
``save_pretrained`` so that our loader sees exactly what a user's download looks like.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Odd sizes on purpose: 5 heads of 16, an ffn that is no multiple of 64, a prime-ish vocab.
PRE_LN = dict(hidden_size=80, num_attention_heads=5, ffn_dim=208, num_hidden_layers=3,
              vocab_size=1000, max_position_embeddings=128, word_embed_proj_dim=80)
# opt-350m's shape: post-LN, embeddings in a smaller space projected in and out.
POST_LN = dict(PRE_LN, do_layer_norm_before=False, word_embed_proj_dim=48)
# A head stored separately from the embedding.
UNTIED = dict(PRE_LN, tie_word_embeddings=False, num_hidden_layers=2)

CONFIGS = {"pre_ln": PRE_LN, "post_ln": POST_LN, "untied": UNTIED}

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Naïve café owners serve crème brûlée and smörgåsbord to the jury.",
    "日本語のテキストと絵文字 😀🎉 are spelled with several bytes each.",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow!",
    "Numbers like 3.14159, 2718 and 42 appear in text too.",
]


def make_hf_model(kind: str, seed: int = 0):
    """A random transformers OPTForCausalLM of one of ``CONFIGS``, in eval mode."""
    from transformers import OPTConfig as HFOPTConfig
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(HFOPTConfig(**CONFIGS[kind], dropout=0.0)).eval()
    # Random init puts LayerNorms at (1, 0) and biases at 0: perturb them so that a wrong
    # norm placement or a dropped bias shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(kind: str, path: Path, seed: int = 0):
    model = make_hf_model(kind, seed)
    model.save_pretrained(path)
    return model


def train_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE with OPT's special tokens at OPT's ids (<s>=0, <pad>=1, </s>=2,
    <unk>=3), saved as vocab.json + merges.txt (as OPT ships) and tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(path))
    tok.save(str(path / "tokenizer.json"))
    return path
