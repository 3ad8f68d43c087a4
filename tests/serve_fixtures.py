"""A tiny served model for the serve tests: a random OPT checkpoint (real safetensors) and
a real byte-level BPE tokenizer trained here from a few invented sentences; nothing is
committed. Also the reference the server is checked against: log-probabilities from one
plain causal forward pass of the model over the whole sequence (no KV cache, no batching).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dejavu.runtime.checkpoint import load_model, save_model
from dejavu.runtime.model import Batch, OPTModel, full_positions
from dejavu.runtime.opt_config import OPTConfig

SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park with a red ball",
    "naïve café owners serve crème brûlée to the jury",
    "numbers like 3.14 and 42 appear in text too",
    "User: hello there\nAssistant: hi, how can I help?",
    "emoji 😀 take four bytes and kanji 日本 take three",
]
MAX_POSITIONS = 96


def train_tokenizer(path: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 10, trainer)
    tok.save(str(path / "tokenizer.json"))
    # What transformers' AutoTokenizer needs to load the same tokenizer (lm-eval uses it).
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": False}))


def make_checkpoint(path: Path, seed: int = 0, max_positions: int = MAX_POSITIONS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    config = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=72,
                       num_attention_heads=4, max_position_embeddings=max_positions,
                       word_embed_proj_dim=32, torch_dtype="float32")
    model = OPTModel(config)
    generator = torch.Generator().manual_seed(seed)
    # Larger than OPT's 0.02 so that the next-token distribution is far from uniform: greedy
    # choices and log-probabilities then differ clearly between tokens.
    model.init_weights(generator, std=0.3)
    save_model(model, path, dtype=torch.float32)
    return path


def reference_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, from one whole-window forward pass."""
    model = load_model(model_dir, dtype=torch.float32)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens, Batch(full_positions(1, len(ids), "cpu")))
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


class Served:
    """A live server on a free loopback port over an in-process engine."""

    def __init__(self, url: str, client, engine, tokenizer, model_dir: Path, http) -> None:
        self.url, self.client, self.engine = url, client, engine
        self.tokenizer, self.model_dir = tokenizer, model_dir
        self.http = http  # a keep-alive httpx.Client on `url` (one connection setup, not many)


def start(model_dir: Path, *, api_key: str | None = None, max_pending: int = 256,
          max_body_bytes: int = 1 << 20, max_batch: int = 4, prefill_chunk: int = 512,
          wrap=None):
    """Context manager: a `Served` whose engine thread and server are stopped on exit.
    `wrap(client)` may put a test double around the real client."""
    import contextlib

    import httpx

    from dejavu.runtime.tokenizer import load_tokenizer
    from dejavu.scheduler.client import LocalClient
    from dejavu.scheduler.engine import Engine
    from dejavu.scheduler.serve import ServeLimits, ServeOptions, make_app, serve_in_thread

    @contextlib.contextmanager
    def running():
        tokenizer = load_tokenizer(model_dir)
        engine = Engine(load_model(model_dir), tokenizer, max_batch=max_batch,
                        prefill_chunk=prefill_chunk)
        client = LocalClient(engine)
        served_client = wrap(client) if wrap else client
        options = ServeOptions(api_key=api_key, limits=ServeLimits(max_pending, max_body_bytes))
        app = make_app(served_client, tokenizer, options, "tiny-opt", close_client=True)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield Served(url, client, engine, tokenizer, model_dir, http)

    return running()
