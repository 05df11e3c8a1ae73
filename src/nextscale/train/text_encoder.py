"""A T5 text encoder small enough to ship with a model, built from the captions it will read.

* ``caption_tokenizer``: a byte-pair tokenizer trained with the ``tokenizers`` library on the captions, with every
  lowercase letter, digit and common punctuation mark in its alphabet, so a word it never saw still becomes pieces
  rather than ``<unk>``. Lowercased (NFKC), T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``</s>``
  appended, as T5 does; wrapped as ``PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads it from the saved folder
  (``T5TokenizerFast`` would rebuild it as a Unigram model on loading). Not T5's Unigram model: on a few thousand
  short captions the Unigram trainer keeps ~85 pieces and spells "on" and "the" letter by letter, where byte-pair
  merges give every caption word one token.
* ``tiny_t5``: a randomly initialised ``T5EncoderModel`` of the given size (a ``d_model`` multiple of 128: Infinity
  pools the text with 128-wide heads).
* ``train_slots``: teaches the encoder to read categorical *slots* from a caption (for the Fashion-MNIST pairs: the
  left and the right item's class). A learned query per slot attends over the encoder's output tokens and a linear
  head classifies it; the encoder is trained through it. Why: a text-to-image transformer trained from scratch on a
  few thousand captions sees every phrasing only through the images it gets; an encoder that already says which
  noun fills which place lets the image model's cross-attention learn one mapping for every phrasing, including
  phrasings it never saw (``prompt_following`` measures that). With ``spans`` (the characters of each noun, its
  slot and class) a ``WordTagger`` also classifies every token on its own, so a noun's side and class sit on the
  noun. The heads are thrown away; the encoder is then frozen.

Requires the ``t2i`` extra (``transformers``, which brings ``tokenizers``).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nextscale.config import check_int
from nextscale.errors import ConfigError, InvalidInputError
from nextscale.models.text_encoder import T5_MAX_LEN, TextEncoder, _transformers

log = logging.getLogger("nextscale.train")
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
ALPHABET = list(string.ascii_lowercase + string.digits + ",.:;!?'-/()&")


def caption_tokenizer(captions: Sequence[str], vocab_size: int = 256) -> object:
    """A T5-style byte-pair tokenizer trained on ``captions`` (see the module docstring); returns a
    ``PreTrainedTokenizerFast``."""
    check_int("vocab_size", vocab_size, len(SPECIAL_TOKENS) + len(ALPHABET) + 1)
    texts = [c for c in captions if isinstance(c, str) and c.strip()]
    if not texts:
        raise InvalidInputError("need at least one non-empty caption to build a tokenizer from")
    tf = _transformers()
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # punctuation its own token: "bag," and "left:" are "bag" and "left" to the encoder, as in any phrasing
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=ALPHABET, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.model_max_length = T5_MAX_LEN
    return wrapped


@dataclass(frozen=True)
class TinyT5Config:
    """A small T5 encoder (``transformers.T5Config``; gated-GELU feed-forward as flan-t5)."""

    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256

    def __post_init__(self) -> None:
        for name in ("d_model", "num_layers", "num_heads", "d_ff"):
            check_int(name, getattr(self, name), 1, 65_536)
        if self.d_model % 128:
            raise ConfigError(f"d_model must be a multiple of 128 (Infinity's text pool heads), got {self.d_model}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")


def tiny_t5(tokenizer: object, cfg: TinyT5Config = TinyT5Config(), seed: int = 0) -> TextEncoder:
    """A randomly initialised (``seed``) T5 encoder of ``cfg``'s size over ``tokenizer``'s vocabulary."""
    tf = _transformers()
    t5 = tf.T5Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.num_heads,
        num_heads=cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    encoder = tf.T5EncoderModel(t5).float().eval().requires_grad_(False)
    return TextEncoder(tokenizer, encoder)


class SlotHeads(nn.Module):
    """One learned query per slot attends over a caption's encoded tokens (padding masked); a linear head per slot
    classifies what it pooled."""

    def __init__(self, dim: int, classes: Sequence[int]):
        super().__init__()
        self.query_SC = nn.Parameter(torch.randn(len(classes), dim) / dim**0.5)
        self.heads = nn.ModuleList(nn.Linear(dim, n) for n in classes)

    def forward(self, h_BNC: torch.Tensor, mask_BN: torch.Tensor) -> list[torch.Tensor]:
        scores_BSN = torch.einsum("sc,bnc->bsn", self.query_SC, h_BNC) / h_BNC.shape[-1] ** 0.5
        scores_BSN = scores_BSN.masked_fill(~mask_BN.bool().unsqueeze(1), -torch.inf)
        pooled_BSC = torch.einsum("bsn,bnc->bsc", scores_BSN.softmax(-1), h_BNC)
        return [head(pooled_BSC[:, s]) for s, head in enumerate(self.heads)]


Span = tuple[int, int, int, int]  # (start, end, slot, value): characters [start, end) of a caption name it


class WordTagger(nn.Module):
    """Two linear heads on each output token: which slot the word it belongs to fills (or none), and with what value
    (or none). Each token is classified from its own vector alone, so what a noun says ends up on the noun."""

    def __init__(self, dim: int, slots: int, values: int):
        super().__init__()
        self.slot, self.value = nn.Linear(dim, slots + 1), nn.Linear(dim, values + 1)  # the last index: none

    def forward(self, h_BNC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot(h_BNC), self.value(h_BNC)


def word_targets(
    offsets_BN2: torch.Tensor, mask_BN: torch.Tensor, spans: Sequence[Sequence[Span]], slots: int, values: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the ``(slot, value)`` a ``WordTagger`` should read: those of the span its characters overlap
    (its ``offsets_BN2``, as a fast tokenizer gives them: "▁bag" covers the space before "bag"), ``slots`` /
    ``values`` (none) for a token in no span, -100 (no loss) for padding and for a span's -1 (not known)."""
    slot_BN = torch.full(mask_BN.shape, slots, dtype=torch.long)
    value_BN = torch.full(mask_BN.shape, values, dtype=torch.long)
    for b, caption_spans in enumerate(spans):
        start_N, end_N = offsets_BN2[b, :, 0], offsets_BN2[b, :, 1]
        for start, end, slot, value in caption_spans:
            # overlaps [start, end) and has characters (special tokens have none)
            inside_N = (start_N.clamp(min=start) < end_N.clamp(max=end)) & (end_N > start_N)
            slot_BN[b, inside_N] = slot if slot >= 0 else -100
            value_BN[b, inside_N] = value if value >= 0 else -100
    pad_BN = ~mask_BN.bool()
    return slot_BN.masked_fill(pad_BN, -100), value_BN.masked_fill(pad_BN, -100)


def _encoded(encoder: TextEncoder, captions: Sequence[str], offsets: bool = False) -> tuple[Any, torch.Tensor]:
    tokens = encoder.tokenizer(list(captions), padding="longest", return_tensors="pt", return_offsets_mapping=offsets)
    h = encoder.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)["last_hidden_state"]
    return tokens, h


def read_slots(encoder: TextEncoder, heads: SlotHeads, captions: Sequence[str]) -> list[torch.Tensor]:
    """Each slot's logits ``[N, classes]`` for ``captions``, as ``heads`` read the encoder's output."""
    tokens, h = _encoded(encoder, captions)
    return heads(h, tokens.attention_mask)


def _check_spans(spans: Sequence[Sequence[Span]], captions: Sequence[str], num_classes: Sequence[int]) -> None:
    if len(spans) != len(captions):
        raise InvalidInputError(f"spans must give one list per caption ({len(captions)}), got {len(spans)}")
    for n, (caption_spans, text) in enumerate(zip(spans, captions)):
        for span in caption_spans:
            ok = len(span) == 4 and all(isinstance(v, int) for v in span)
            if ok:
                start, end, slot, value = span
                ok = 0 <= start < end <= len(text) and -1 <= slot < len(num_classes)
                ok = ok and -1 <= value < (num_classes[slot] if slot >= 0 else max(num_classes))
            if not ok:
                raise InvalidInputError(
                    f"span {span!r} of caption {n} ({text!r}): need (start, end, slot, value) ints with "
                    f"0 <= start < end <= {len(text)}, slot in -1..{len(num_classes) - 1}, value -1 or a class of it"
                )


def train_slots(
    encoder: TextEncoder,
    captions: Sequence[str],
    slots_NS: torch.Tensor,
    num_classes: Sequence[int],
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    warmup: float = 0.05,
    freeze_encoder: bool = False,
    on_step: Callable[[int, SlotHeads], None] | None = None,
    spans: Sequence[Sequence[Span]] | None = None,
) -> tuple[SlotHeads, dict[str, float]]:
    """Train ``encoder`` (in place; left frozen again) to read slot ``s`` of caption ``n`` as class
    ``slots_NS[n, s]`` of ``num_classes[s]`` (-1: the caption does not say; no loss), ``lr`` warmed up linearly over
    the first ``warmup`` of the steps then decayed linearly; returns the heads (for ``slot_accuracy`` on held-out
    captions) and the last step's loss and accuracy (all slots right). ``freeze_encoder``: train the heads alone, a
    probe of what the encoder's features already say. ``on_step(steps done, heads)`` runs after every step (a
    learning curve on held-out captions).

    ``spans``: per caption, the words that name a slot's filler, ``(start, end, slot, value)`` (slot or value -1:
    not known; ``data.captions.noun_spans``). A ``WordTagger`` then also learns, from each token's vector alone,
    which slot its word fills and with what value, and the loss is the mean of both objectives (the tagging one
    the sum of its two heads'). Why: the slot
    queries read a caption as a whole, and an encoder can satisfy them with a code for the pair (on the Fashion-MNIST
    pairs, held-out pairs read right 75 % of the time); tagging each noun with its own side and class puts that on
    the noun, where it cannot depend on what the other noun is (benchmarks/RESULTS.md). Needs a fast tokenizer
    (character offsets)."""
    if slots_NS.ndim != 2 or slots_NS.shape != (len(captions), len(num_classes)):
        raise InvalidInputError(
            f"slots_NS must be [{len(captions)} captions, {len(num_classes)} slots], got {tuple(slots_NS.shape)}"
        )
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    if not 0 <= warmup < 1:
        raise InvalidInputError(f"warmup must be a fraction of the steps in [0, 1), got {warmup!r}")
    if spans is not None:
        _check_spans(spans, captions, num_classes)
        if not getattr(encoder.tokenizer, "is_fast", False):
            raise InvalidInputError("spans need a fast tokenizer (character offsets of each token)")
    model = encoder.encoder.train(not freeze_encoder).requires_grad_(not freeze_encoder)
    heads = SlotHeads(int(model.config.d_model), num_classes)
    tagger = None if spans is None else WordTagger(int(model.config.d_model), len(num_classes), max(num_classes))
    trained = [*heads.parameters()] + ([] if tagger is None else [*tagger.parameters()])
    trained += [] if freeze_encoder else [*model.parameters()]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    loss_v = acc_v = 0.0
    for step in range(steps):
        idx = torch.randint(len(captions), (batch_size,), generator=gen)
        tokens, h_BNC = _encoded(encoder, [captions[i] for i in idx.tolist()], offsets=tagger is not None)
        logits = heads(h_BNC, tokens.attention_mask)
        target_BS = slots_NS[idx]
        said_BS = target_BS >= 0  # a slot no caption of the batch says stays out of the graph (no decay either)
        loss = sum(
            F.cross_entropy(lg[said_BS[:, s]], target_BS[said_BS[:, s], s])
            for s, lg in enumerate(logits)
            if said_BS[:, s].any()
        ) / len(logits)
        if tagger is not None:
            slot_BN, value_BN = word_targets(
                tokens.offset_mapping,
                tokens.attention_mask,
                [spans[i] for i in idx.tolist()],  # type: ignore[index]
                len(num_classes),
                max(num_classes),
            )
            slot_BNK, value_BNK = tagger(h_BNC)
            tag_loss = F.cross_entropy(slot_BNK.flatten(0, 1), slot_BN.flatten(), ignore_index=-100)
            tag_loss = tag_loss + F.cross_entropy(value_BNK.flatten(0, 1), value_BN.flatten(), ignore_index=-100)
            loss = (loss + tag_loss) / 2  # the two objectives weighed equally, as measured
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        for g in opt.param_groups:  # linear warm-up, then linear decay: the last steps settle
            g["lr"] = lr * min((step + 1) / max(warmup * steps, 1), 1 - step / steps)
        opt.step()
        with torch.no_grad():
            right = torch.stack([(lg.argmax(-1) == target_BS[:, s]) | ~said_BS[:, s] for s, lg in enumerate(logits)])
            right = right.all(0)
        loss_v, acc_v = float(loss.detach()), float(right.float().mean())
        if (step + 1) % 100 == 0:
            log.info("text encoder step %d/%d: loss %.4f, slot accuracy %.3f", step + 1, steps, loss_v, acc_v)
        if on_step is not None:
            on_step(step + 1, heads)
    model.eval().requires_grad_(False)
    return heads.eval().requires_grad_(False), {"loss": loss_v, "acc": acc_v}


@torch.no_grad()
def slot_accuracy(encoder: TextEncoder, heads: SlotHeads, captions: Sequence[str], slots_NS: torch.Tensor) -> float:
    """Share of ``captions`` whose every slot ``heads`` reads right."""
    logits = read_slots(encoder, heads, captions)
    return float(torch.stack([lg.argmax(-1) == slots_NS[:, s] for s, lg in enumerate(logits)]).all(0).float().mean())
