"""The architecture of one OPT checkpoint, read from (and written to) its config.json.

This module knows Hugging Face's field names for OPT and nothing about where the weights
live or how they are executed. Every field is validated once, here, with an error that
names the field, the value and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# OPT's learned position table has two extra rows in front (a fairseq legacy): position p
# of a sequence reads row p + 2.
POSITION_OFFSET = 2


class ConfigError(ValueError):
    """A config.json (or an architecture setting) that cannot describe an OPT model."""


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    # Pre-LN (every OPT but 350m) or post-LN (opt-350m).
    do_layer_norm_before: bool = True
    # opt-350m embeds in 512 dims and projects in/out of the 1024-dim residual stream.
    word_embed_proj_dim: int = 768
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    # Only meaningful with do_layer_norm_before: drop the decoder's final layer norm.
    remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    activation_function: str = "relu"
    torch_dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                     "num_attention_heads", "max_position_embeddings", "word_embed_proj_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name}={value!r}: expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config field hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.activation_function != "relu":
            raise ConfigError(
                f"config field activation_function={self.activation_function!r}: only 'relu' "
                "is supported (contextual sparsity relies on ReLU's exact zeros)"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"config field {name}={value!r}: expected an id in [0, {self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    # --- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> OPTConfig:
        model_type = raw.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"{source}: model_type={model_type!r}, expected 'opt'")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "_remove_final_layer_norm":
                values["remove_final_layer_norm"] = bool(value)
            elif key == "torch_dtype" or key == "dtype":
                values["torch_dtype"] = str(value)
            elif key in known:
                values[key] = value
        # Older configs omit word_embed_proj_dim when it equals hidden_size.
        values.setdefault("word_embed_proj_dim", values.get("hidden_size", cls.hidden_size))
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:  # a field of the wrong kind that dataclass rejected
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> OPTConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a checkpoint needs config.json)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["_remove_final_layer_norm"] = out.pop("remove_final_layer_norm")
        out.update(
            model_type="opt",
            architectures=["OPTForCausalLM"],
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            init_std=0.02,
            use_cache=True,
        )
        return out
