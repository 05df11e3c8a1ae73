"""The state of one generation request as it moves through the scales.

*Every request has a scale index ``si`` and the same ``S`` scales; a step feeds ``x`` (the request's tokens of
scale ``si``, conditional and unconditional rows) through the transformer, and ``advance`` turns the logits
into tokens and the next scale's input.* Who runs the transformer is not this module's business: the
pipeline's loop runs one request at a time, the serving engine packs many requests into one call.

How each scale runs is the request's ``RequestPlan`` (``engine/var/plan.py``): which transformer, whether the
unconditional rows run, whether the scale is skipped, and a per-block hook. The exact plan is the plain loop.

Shapes: ``B`` images, ``R`` rows (2B with guidance: conditional rows first; B at an unguided scale), ``l``
tokens at scale ``si``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nextscale.engine.kv_cache import CompactKV, KVCache, KVSlot, RequestKV
from nextscale.engine.sampling import (
    Generators,
    cfg_double,
    cfg_labels,
    cfg_mix,
    cfg_weight,
    gumbel_soft_codes,
    sample_tokens,
)
from nextscale.engine.var.params import ForcedTokens, SamplingParams
from nextscale.engine.var.plan import MAIN, REFINER, HookContext, RequestPlan, StepPlan
from nextscale.models.attention import CachedPrefill, CachedStep, Layout
from nextscale.models.tokenizers.msvq import MultiScaleQuantizer
from nextscale.models.var import VAR, Conditioning


@dataclass
class SampleResult:
    """What a sampler returns — the fast loop (``engine/var/sampler.py``) and the reference alike."""

    tokens: list[torch.Tensor]  # one [B, pn*pn] map per scale ([B, 0] for a skipped scale)
    f_hat_BChw: torch.Tensor  # the final latent
    next_inputs: list[torch.Tensor]  # the area-downsampled latent fed to scales 1.. ([B, l, Cv] each)
    stats: dict = field(default_factory=dict)  # rows_x_tokens per scale, kv_bytes_peak, the plan's methods


@dataclass
class ScaleResult:
    """What one scale produced: its token map and the running latent after adding it.

    ``f_hat_BChw`` is the running latent itself, which later scales update in place (copying it at every scale
    would cost every caller): a caller that keeps it past the callback must copy it (the pipeline's previews do).
    """

    si: int
    num_scales: int
    idx_Bl: torch.Tensor
    f_hat_BChw: torch.Tensor

    @property
    def is_last(self) -> bool:
        return self.si == self.num_scales - 1


@dataclass
class _ModelState:
    """One transformer's view of the request: its conditioning (both guidance rows), embeddings and KV cache."""

    name: str  # MAIN or REFINER
    model: VAR
    cond: Conditioning
    lvl_pos: torch.Tensor
    kv: RequestKV


KVFactory = Callable[[VAR, int], RequestKV]


def own_cache(model: VAR, rows: int, plan: RequestPlan | None = None) -> RequestKV:
    """A private cache for one request: full length, or compressed to the plan's per-layer capacities."""
    if plan is not None and plan.compresses_kv:
        return CompactKV.own(model, rows, plan.kv_capacity(model.scales.token_counts(), model.depth))
    return KVCache.for_model(model, rows=rows)


class Generation:
    def __init__(
        self,
        model: VAR,
        quantizer: MultiScaleQuantizer,
        labels_B: torch.Tensor,
        params: SamplingParams,
        generators: Generators,
        kv: RequestKV | None = None,
        forced: ForcedTokens | None = None,
        lvl_pos_1LC: torch.Tensor | None = None,
        plan: RequestPlan | None = None,
        refiner: VAR | None = None,
        refiner_kv: KVFactory = own_cache,
    ):
        self.quant, self.params = quantizer, params
        self.generators, self.forced = generators, forced
        self.labels_B = labels_B
        self.B = labels_B.shape[0]
        self.num_scales = model.scales.num_scales
        self.plan = plan or RequestPlan.exact(self.num_scales)
        if len(self.plan.steps) != self.num_scales:
            raise ValueError(f"plan has {len(self.plan.steps)} steps for {self.num_scales} scales")
        if self.plan.uses_refiner and refiner is None:
            raise ValueError("the plan runs scales on a refiner, but no refiner model was given")
        self._models = {MAIN: model, REFINER: refiner}
        self._refiner_kv = refiner_kv
        self.si = 0
        side = quantizer.side
        self.f_hat = torch.zeros(self.B, quantizer.Cvae, side, side, device=labels_B.device)
        self.tokens: list[torch.Tensor] = []
        self.next_inputs: list[torch.Tensor] = []
        self.scratch: dict = {}  # per-request memory of block hooks (e.g. FastVAR's cached block outputs)
        self.kv_bytes_peak = 0
        self.rows_x_tokens = [0.0] * self.num_scales  # query rows x tokens each scale ran (0: skipped)
        self.flops = 0.0  # the transformer's multiply-adds x 2, by a FLOP model (linear layers + attention)
        first = self.plan.steps[0].model
        self._state: _ModelState = self._model_state(first, kv, lvl_pos_1LC)
        self.prefill = 0  # tokens before this scale's own in ``x`` (a refiner's first scale recomputes the prefix)
        x_RlC = self._state.model.first_tokens(self._state.cond, self._state.lvl_pos)
        self.x = x_RlC if self.step.guided else x_RlC[: self.B]
        self._tell_kv()

    # ---- the current scale -------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.si >= self.num_scales

    @property
    def step(self) -> StepPlan:
        return self.plan.steps[self.si]

    @property
    def model(self) -> VAR:
        """The transformer that runs the current scale."""
        return self._state.model

    @property
    def kv(self) -> RequestKV:
        return self._state.kv

    @property
    def cond(self) -> Conditioning:
        c = self._state.cond
        return c if self.step.guided else c.select(slice(0, self.B))

    @property
    def rows(self) -> int:
        return self.plan.rows(self.si, self.B)

    @property
    def tokens_this_scale(self) -> int:
        """Query tokens per row in ``x``: this scale's, plus the recomputed prefix on a refiner's first scale."""
        return self.prefill + self._state.model.scales.tokens(self.si)

    def layout(self) -> Layout:
        """The dense layout of this step over the current model's cache (the pipeline's loop)."""
        if self.prefill:
            assert isinstance(self.kv, KVSlot), "a prefix pass fills an uncompressed cache"
            return CachedPrefill(self.kv, self.model.causal_bias(self.tokens_this_scale))
        return CachedStep(self.kv)

    def block_fn(self) -> Callable[..., torch.Tensor] | None:
        """The step's block hook bound to this request (None: blocks run as they are)."""
        hook = self.step.hook
        if hook is None:
            return None
        pn = self.model.scales.patch_nums[self.si]
        return functools.partial(hook, HookContext(self.si, (pn, pn), self.scratch, self.prefill))

    # ---- one scale ----------------------------------------------------------------------------------------------
    def advance(self, logits_RlV: torch.Tensor) -> ScaleResult:
        """Guide, sample, update ``f_hat`` and prepare the next scale's input from this scale's logits."""
        si, p, B, step = self.si, self.params, self.B, self.step
        pn = self.quant.patch_nums[si]
        logits_RlV = logits_RlV[:, self.prefill :]  # a refiner's prefix pass: only this scale's logits are used
        ratio = si / (self.num_scales - 1)
        logits_BlV = cfg_mix(logits_RlV, cfg_weight(p.cfg, si, self.num_scales)) if step.guided else logits_RlV
        idx_Bl = sample_tokens(logits_BlV, p.top_k, p.top_p, self.generators)
        codebook_VC = self.quant.embedding.weight
        if p.more_smooth:
            h_BlCv = gumbel_soft_codes(logits_BlV, ratio, codebook_VC.float(), self.generators)
        else:
            h_BlCv = self.quant.embedding(idx_Bl).float()
        if self.forced is not None:
            keep_Bl = self.forced.keep[si]
            idx_Bl = torch.where(keep_Bl, self.forced.idx[si], idx_Bl)
            h_BlCv = torch.where(keep_Bl.unsqueeze(-1), self.quant.embedding(self.forced.idx[si]).float(), h_BlCv)
        h_BChw = h_BlCv.transpose(1, 2).reshape(B, self.quant.Cvae, pn, pn)
        nxt_BChw = self.quant.next_input(si, self.f_hat, h_BChw)
        self.tokens.append(idx_Bl)
        self._account(si)
        self.si += 1
        while not self.done and self.step.skip:  # skipped scales add nothing: the latent is carried as it is
            self.next_inputs.append(self._input_for(self.si, nxt_BChw))
            self.tokens.append(idx_Bl.new_empty(B, 0))
            nxt_BChw = self.f_hat
            self.si += 1
        if not self.done:
            nxt_BlCv = self._input_for(self.si, nxt_BChw)
            self.next_inputs.append(nxt_BlCv)
            self._enter(self.si, nxt_BlCv)
        return ScaleResult(si, self.num_scales, idx_Bl, self.f_hat)

    def _input_for(self, si: int, nxt_BChw: torch.Tensor) -> torch.Tensor:
        """The running latent at scale ``si``'s side, as tokens [B, l, Cv]."""
        pn = self.quant.patch_nums[si]
        if nxt_BChw.shape[-1] != pn:  # after skipped scales: downsample the latent to this scale instead
            nxt_BChw = self.quant.downsample(self.f_hat, pn)
        return nxt_BChw.reshape(self.B, self.quant.Cvae, -1).transpose(1, 2)

    def _enter(self, si: int, nxt_BlCv: torch.Tensor) -> None:
        """Make ``x`` the input of scale ``si`` (switching transformer first if the plan says so)."""
        step = self.plan.steps[si]
        self.prefill = 0
        if step.model != self._state.name:
            self._hand_off(step.model)
            # The new model has seen nothing yet: its first step recomputes every earlier scale's tokens from the
            # latents the previous model produced (CoDe's refiner prefill, one pass with the block-causal mask).
            ms, R = self._state, self.plan.rows(si, self.B)
            rows = cfg_double if step.guided else (lambda t: t)
            parts = [ms.model.first_tokens(ms.cond, ms.lvl_pos)[:R]]  # scale 0: the class token of each row
            parts += [rows(ms.model.next_tokens(k, self.next_inputs[k - 1], ms.lvl_pos)) for k in range(1, si + 1)]
            self.x = torch.cat(parts, dim=1)
            self.prefill = self.x.shape[1] - ms.model.scales.tokens(si)
            return
        x_BlC = self._state.model.next_tokens(si, nxt_BlCv, self._state.lvl_pos)
        self.x = cfg_double(x_BlC) if step.guided else x_BlC
        self._tell_kv()

    def _tell_kv(self) -> None:
        """A compressed cache decides what it keeps by the current step's plan."""
        kv = self.kv
        if isinstance(kv, CompactKV):
            kv.step, kv.si, kv.pn = self.step, self.si, self.model.scales.patch_nums[self.si]

    def _hand_off(self, name: str) -> None:
        self._state.kv.free()  # the previous model's cache is dropped before the next one is allocated
        self._state = self._model_state(name, None, None)

    def _model_state(self, name: str, kv: RequestKV | None, lvl_pos: torch.Tensor | None) -> _ModelState:
        model = self._models[name]
        assert model is not None
        cond = model.condition(cfg_labels(self.labels_B, model.num_classes))
        if kv is None:
            rows = self.plan.kv_rows(self.B)
            kv = own_cache(model, rows, self.plan) if name == MAIN else self._refiner_kv(model, rows)
        return _ModelState(name, model, cond, model.level_pos() if lvl_pos is None else lvl_pos, kv)

    def _account(self, si: int) -> None:
        """Cost of the step just run: rows x tokens, a FLOP model, and the keys/values now held."""
        m, step = self.model, self.step
        n = self.rows * self.tokens_this_scale * step.tokens_fraction
        self.rows_x_tokens[si] = n
        seen = self.kv.keys_seen
        keys = sum(seen) / len(seen)  # mean keys each query saw (pruning and KV compression shorten some)
        # per token and block: qkv + proj + fc1 + fc2 = 12 C^2 multiply-adds; attention 2 x keys x C
        self.flops += 2 * n * m.depth * (12 * m.C * m.C + 2 * keys * m.C)
        self.kv_bytes_peak = max(self.kv_bytes_peak, self.kv.nbytes_reserved)

    # ---- results -------------------------------------------------------------------------------------------------
    def result(self) -> SampleResult:
        stats = {
            "rows_x_tokens": self.rows_x_tokens,
            "flops": self.flops,
            "kv_bytes_peak": self.kv_bytes_peak,
            "accel": list(self.plan.names),
        }
        return SampleResult(self.tokens, self.f_hat, self.next_inputs, stats)

    def release(self) -> None:
        self.kv.free()
