"""The T5 text encoder of text-to-image models (Infinity: google/flan-t5-xl's encoder), and the packed text
features it returns.

Follows the official ``encode_prompt`` (``tools/run_infinity.py:38-57``): tokenise to 512 tokens (EOS appended by
the tokenizer, padding to max_length, truncation), run the encoder, keep each prompt's valid tokens as float32 and
pack them: row r's tokens are ``kv_compact[cu_seqlens[r]:cu_seqlens[r+1]]``. ``transformers`` is imported only
when an encoder is built (the ``t2i`` extra).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from nextscale.errors import ConfigError, InvalidInputError

DEFAULT_T5 = "google/flan-t5-xl"
T5_MAX_LEN = 512  # load_tokenizer sets model_max_length = 512; encode_prompt pads/truncates to it
INSTALL_HINT = "pip install 'nextscale[t2i]'"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


@dataclass(frozen=True)
class TextFeatures:
    """Raw encoder features of R rows, packed without padding: ``kv_compact`` [N, Ct5] float32, N = sum(lens)."""

    kv_compact: torch.Tensor
    lens: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lens", tuple(int(n) for n in self.lens))
        if not self.lens or min(self.lens) < 1:
            raise InvalidInputError(f"text features need at least one row of >= 1 token, got lens {self.lens}")
        if self.kv_compact.ndim != 2 or self.kv_compact.shape[0] != sum(self.lens):
            raise InvalidInputError(
                f"kv_compact must be [sum(lens)={sum(self.lens)}, channels], got {tuple(self.kv_compact.shape)}"
            )

    @property
    def rows(self) -> int:
        return len(self.lens)

    @property
    def channels(self) -> int:
        return int(self.kv_compact.shape[1])

    @property
    def max_len(self) -> int:
        return max(self.lens)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 [R+1] row offsets, as the official ``cu_seqlens_k``."""
        lens = torch.tensor(self.lens, dtype=torch.int32, device=self.kv_compact.device)
        return F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))

    def row(self, r: int) -> torch.Tensor:
        b = sum(self.lens[:r])
        return self.kv_compact[b : b + self.lens[r]]

    def select(self, rows: Sequence[int]) -> TextFeatures:
        return TextFeatures(torch.cat([self.row(r) for r in rows]), tuple(self.lens[r] for r in rows))

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        if len(parts) == 1:
            return parts[0]
        return TextFeatures(torch.cat([p.kv_compact for p in parts]), tuple(n for p in parts for n in p.lens))


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """``tokenizer.save_pretrained(folder)``, loadable by transformers 4 and 5: transformers 5 names a generic fast
    tokenizer's class ``TokenizersBackend``, which 4.x does not know; ``PreTrainedTokenizerFast`` both load."""
    tokenizer.save_pretrained(folder)
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            config.write_text(json.dumps(data, indent=2) + "\n")


def _transformers() -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"text-to-image models need the transformers package; {INSTALL_HINT}") from None
    return transformers


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class TextEncoder:
    """A T5 tokenizer + encoder (fp32, eval, no grad) that turns prompts into ``TextFeatures``."""

    def __init__(self, tokenizer: Any, encoder: Any):
        self.tokenizer, self.encoder = tokenizer, encoder

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_T5,
        tokenizer: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> TextEncoder:
        """Load a ``T5EncoderModel`` and its tokenizer (from ``tokenizer`` if given, else the same place) from a
        folder or a hub id, as ``load_tokenizer`` does but in float32."""
        tf = _transformers()
        if tokenizer is None and Path(name_or_path, "config.json").is_file():
            # diffusers' layout: text_encoder/ beside tokenizer/ (the model folders nextscale writes, too)
            sibling = Path(name_or_path).parent / "tokenizer"
            if not any(Path(name_or_path, f).is_file() for f in TOKENIZER_FILES) and sibling.is_dir():
                tokenizer = sibling
        src, tok_src = str(name_or_path), str(name_or_path if tokenizer is None else tokenizer)
        tf.utils.logging.disable_progress_bar()  # its per-load bar would garble the CLI's one-line messages
        try:
            tok = tf.AutoTokenizer.from_pretrained(tok_src, legacy=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a T5 tokenizer from {tok_src!r}: {_first_line(e)}") from None
        try:
            encoder = tf.T5EncoderModel.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a T5 text encoder from {src!r}: {_first_line(e)}") from None
        tok.model_max_length = T5_MAX_LEN
        encoder = encoder.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return cls(tok, encoder)

    @property
    def channels(self) -> int:
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], pad_to_max_length: bool = True) -> TextFeatures:
        """Encode prompts to packed features (one row per prompt).

        ``pad_to_max_length`` pads every prompt to 512 tokens as the official code does (the numbers it produces);
        False pads to the longest prompt only, much faster on a CPU and equal up to float rounding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidInputError("need at least one prompt, got an empty list")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise InvalidInputError(f"prompt {i} must be a non-empty string, got {p!r}")
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > T5_MAX_LEN:
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens; the text encoder keeps the first {T5_MAX_LEN}", stacklevel=2
                )
        tokens = self.tokenizer(
            prompts,
            max_length=T5_MAX_LEN,
            padding="max_length" if pad_to_max_length else "longest",
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        feats = self.encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()
        lens = [int(n) for n in mask.sum(dim=-1).tolist()]
        return TextFeatures(torch.cat([f[:n] for n, f in zip(lens, feats.unbind(0))]), tuple(lens))
