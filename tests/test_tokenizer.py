"""Tokenizer loading (tokenizer.json and OPT's vocab.json + merges.txt), agreement with
transformers' OPT-style tokenizer, and streaming detokenisation that never splits a
character."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from opt_fixtures import CORPUS, train_tokenizer

from dejavu.runtime.tokenizer import TokenizerError, load_tokenizer

TEXTS = [
    "The quick brown fox",
    "Naïve café 😀 and 日本語!",
    "  leading spaces and </s> a special token inside",
    "digits 3.14159 and emoji 🎉🎉",
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    both = train_tokenizer(root / "both")
    json_only = root / "json"
    json_only.mkdir()
    shutil.copy(both / "tokenizer.json", json_only)
    bpe_only = root / "bpe"
    bpe_only.mkdir()
    shutil.copy(both / "vocab.json", bpe_only)
    shutil.copy(both / "merges.txt", bpe_only)
    return {"json": json_only, "bpe": bpe_only}


@pytest.fixture(scope="module")
def hf_reference(tok_dirs):
    """transformers' GPT-2 tokenizer set up as OPT's: </s> as BOS, prepended to every text."""
    from transformers import GPT2Tokenizer

    d = tok_dirs["bpe"]
    return GPT2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"),
                         bos_token="</s>", eos_token="</s>", unk_token="</s>",
                         pad_token="<pad>", add_bos_token=True)


@pytest.mark.parametrize("kind", ["json", "bpe"])
def test_encode_matches_transformers_opt_tokenizer(tok_dirs, hf_reference, kind):
    tok = load_tokenizer(tok_dirs[kind])
    assert (tok.bos_id, tok.eos_id) == (2, 2)
    assert tok.vocab_size == json.loads((tok_dirs["bpe"] / "vocab.json").read_text()).__len__()
    for text in TEXTS + CORPUS:
        ids = tok.encode(text)
        assert ids == hf_reference(text)["input_ids"], text
        assert ids[0] == 2 and ids.count(2) == 1 + text.count("</s>")
        assert tok.decode(ids) == text.replace("</s>", "")
        assert tok.decode(ids, skip_special=False) == "</s>" + text


def test_bos_from_config_json(tok_dirs, tmp_path):
    shutil.copytree(tok_dirs["bpe"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"bos_token_id": 0,
                                                            "eos_token_id": 2}))
    tok = load_tokenizer(tmp_path / "m")
    assert tok.encode("fox")[0] == 0 and tok.eos_id == 2


@pytest.mark.parametrize("kind", ["json", "bpe"])
def test_stream_never_splits_a_character(tok_dirs, kind):
    tok = load_tokenizer(tok_dirs[kind])
    text = "Naïve 😀 café 日本語 🎉 crème"
    ids = tok.encode(text, add_bos=False)
    # The test only means something if some token holds part of a character.
    partial = [i for i in ids if not _valid_utf8(tok.token_bytes(i))]
    assert partial, "the tiny vocabulary should split multi-byte characters"

    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # something was held back until its character was complete


def test_stream_skips_special_tokens_and_flushes_incomplete_tail(tok_dirs):
    tok = load_tokenizer(tok_dirs["bpe"])
    emoji = tok.encode("😀", add_bos=False)
    assert len(emoji) > 1
    stream = tok.detokenizer()
    assert stream.push(tok.eos_id) == ""
    assert stream.push(emoji[0]) == ""
    assert stream.finish() == "\ufffd"  # a cut-off character shows as U+FFFD, only at the end


def test_non_byte_level_tokenizer_streams_by_redecoding(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5, "##s": 6}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert not tok.byte_level
    ids = tok.encode("hellos world")
    assert ids == [2, 4, 6, 5]
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.finish() == "hellos world"


def test_errors_are_one_line(tmp_path, tok_dirs):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
    tok = load_tokenizer(tok_dirs["bpe"])
    with pytest.raises(TokenizerError, match="not a token id"):
        tok.decode([5, -1])
    # Ids past the tokenizer's vocabulary (the model's padding rows) decode to nothing.
    assert tok.decode([5, tok.vocab_size + 3]) == tok.decode([5]) != ""
    stream = tok.stream()
    assert stream.push(tok.vocab_size) == "" and stream.finish() == ""


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
