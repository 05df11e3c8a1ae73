"""One Infinity request's progress, one scale per ``step()``: the per-scale step the pipeline's loop and the serving
engine share (the reference loop, ``reference.py``, is the oracle both are tested against).

A request owns its conditioning (the prompts' pooled vector, AdaLN vectors and per-row text keys/values, computed once
at admission: ``Infinity.condition``), its KV cache (a ``KVSlot`` of a pool, or a private ``KVCache``), its schedule
(template and pixel budget: requests of different sizes run side by side) and its running latent. Guidance rows are
fixed for the whole request (2B when any scale is guided), as the official loop — up to the request's plan.

How each scale runs is the request's ``RequestPlan`` (``engine/var/plan.py``, shared with VAR; the exact plan is the
official loop, bit for bit): an unguided scale (cfg-cutoff) runs the conditional rows only, from then on (the
cache's unconditional rows are no longer written or read); a skipped scale (skip-scales) samples nothing and the
summed codes, always at the final grid, feed the next scale or are decoded as they are (the official ``trunk_scale``
early stop, FastVAR's and SkipVAR's scale skipping); a compressing step (scalekv, hack) keeps the positions its
selector picks in a ``CompactKV``; a block hook (fastvar's token pruning) replaces blocks of a scale, with the RoPE
rows of the tokens it keeps (``CachedScale.kept``) and a scratch dict that lives with the request. Refiner hand-offs
(code) have no Infinity refiner: such a plan is refused. Per-request plans depend on the schedule (its token counts),
so the engine takes a ``SchedulePlans`` (one plan per schedule, made on demand) where a fixed ``RequestPlan`` would fit
one size only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nextscale.engine.infinity.params import InfinityParams
from nextscale.engine.kv_cache import CompactKV, KVCache, KVPool, compact_rows
from nextscale.engine.sampling import Generators, sample_tokens
from nextscale.engine.var.plan import MAIN, HookContext, RequestPlan
from nextscale.errors import InvalidInputError
from nextscale.models.attention import DenseRows, KVAttend
from nextscale.models.infinity import (
    BlockFn,
    CachedScale,
    Conditioning,
    CrossAttnBlock,
    Infinity,
    InfinityLayout,
)
from nextscale.models.infinity_scales import InfinitySchedule, scale_rope
from nextscale.models.text_encoder import TextFeatures
from nextscale.models.tokenizers.bsq import BSQVAE, bits_to_codes, latent_to_tokens, unpatchify_bits, upsample_codes


@dataclass
class ScaleOutput:
    """What one ``step`` did: the scale, its bits [B, h, w, d] and the codes summed so far [B, d_vae, 1, H, W] (the
    request's own buffer: copy it to keep it past the next step)."""

    si: int
    bits_Bhwd: torch.Tensor
    summed_codes: torch.Tensor


def check_request(model: Infinity, vae: BSQVAE, sched: InfinitySchedule, params: InfinityParams) -> None:
    """What a request must satisfy before any work: per-scale lists of the schedule's length, an inner guidance
    layer inside the model, a tokenizer of the transformer's bits."""
    S = sched.num_scales
    for name in ("cfg", "tau"):
        v = getattr(params, name)
        if isinstance(v, tuple) and len(v) != S:
            raise InvalidInputError(
                f"{name} has {len(v)} values but the schedule has {S} scales: give one number or {S} values"
            )
    k = params.cfg_insertion_layer
    if k and model.depth + k <= 0:
        raise InvalidInputError(
            f"cfg_insertion_layer={k} is outside a model of {model.depth} blocks: 0 or -1 .. -{model.depth - 1}"
        )
    if model.cfg.bits != vae.cfg.token_bits:
        raise InvalidInputError(
            f"the transformer predicts {model.cfg.bits} bits per token, the tokenizer gives {vae.cfg.token_bits}"
        )


def request_rows(
    params: InfinityParams, sched: InfinitySchedule, num_images: int, plan: RequestPlan | None = None
) -> int:
    """KV rows a request holds: both guidance branches when any scale is guided (by its cfg and its plan)."""
    guided = params.guided(sched.num_scales) and (plan is None or plan.steps[plan.run_scales[0]].guided)
    return 2 * num_images if guided else num_images


def check_plan(plan: RequestPlan | None, sched: InfinitySchedule) -> None:
    """A plan an Infinity request can run: one step per scale of its schedule, no refiner."""
    if plan is None:
        return
    if len(plan.steps) != sched.num_scales:
        raise InvalidInputError(f"plan has {len(plan.steps)} steps for the schedule's {sched.num_scales} scales")
    run = [plan.steps[si] for si in plan.run_scales]
    if any(p.model != MAIN for p in run):
        raise InvalidInputError("an Infinity model has no refiner: code does not apply")


def plan_units(
    plan: RequestPlan | None, params: InfinityParams, sched: InfinitySchedule, num_images: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per scale the transformer runs (up to ``trunk_scale``): its query tokens per row and its rows."""
    S = sched.num_scales
    stop = S if params.trunk_scale is None else min(S, params.trunk_scale)
    run = [si for si in range(stop) if plan is None or not plan.steps[si].skip]
    branches = 2 if params.guided(S) else 1
    rows = tuple(branches * num_images if plan is None or plan.steps[si].guided else num_images for si in run)
    return tuple(sched.lengths[si] for si in run), rows


def kv_capacities(plan: RequestPlan, sched: InfinitySchedule, depth: int) -> tuple[int, ...]:
    """Per layer, the most positions a compressed cache of ``plan`` holds on ``sched``."""
    return plan.kv_capacity(sched.lengths, depth)


def own_cache(
    model: Infinity, rows: int, sched: InfinitySchedule, plan: RequestPlan | None, bin_len: int
) -> KVCache | CompactKV:
    """A private cache for one request (the pipeline's loop): full length, or compressed to the plan's per-layer
    capacities, packed into pool rows of ``bin_len`` positions (the engine's pool row length, so that the rows of a
    compressed cache split into the same pieces, and attend in the same calls, as in the engine)."""
    w, c = model.head.weight, model.cfg
    if plan is None or not plan.compresses_kv:
        return KVCache(KVPool(model.depth, rows, c.num_heads, c.head_dim, sched.seq_len, w.dtype, w.device))
    caps = kv_capacities(plan, sched, model.depth)
    pool_rows = compact_rows(rows, caps, bin_len)
    return CompactKV(
        KVCache(KVPool(model.depth, pool_rows, c.num_heads, c.head_dim, bin_len, w.dtype, w.device)), rows, caps
    )


@dataclass(frozen=True)
class SchedulePlans:
    """One acceleration setting's plans, one per schedule (a plan's KV budgets follow the schedule's token counts):
    ``make(schedule)`` builds one (None: exact), kept once made. ``names``: the methods, as spec strings."""

    make: Callable[[InfinitySchedule], RequestPlan | None]
    names: tuple[str, ...] = ()
    _made: dict[InfinitySchedule, RequestPlan | None] = field(default_factory=dict, compare=False, repr=False)

    def for_schedule(self, sched: InfinitySchedule) -> RequestPlan | None:
        if sched not in self._made:
            plan = self.make(sched)
            check_plan(plan, sched)
            self._made[sched] = plan
        return self._made[sched]


class InfinityGeneration:
    """A request in progress. ``step()`` samples the next scale; ``done`` after the last (or ``trunk_scale``)."""

    def __init__(
        self,
        model: Infinity,
        vae: BSQVAE,
        text: TextFeatures,
        sched: InfinitySchedule,
        params: InfinityParams,
        generators: Generators,
        kv: KVAttend,
        negative: TextFeatures | None = None,
        release: Callable[[], None] | None = None,
        plan: RequestPlan | None = None,
    ):
        check_request(model, vae, sched, params)
        check_plan(plan, sched)
        self.model, self.vae, self.sched, self.params, self.generators = model, vae, sched, params, generators
        self.B, self.kv, self._release = text.rows, kv, release
        S = sched.num_scales
        self.plan = plan or RequestPlan.exact(S)
        self.guided = request_rows(params, sched, self.B, plan) == 2 * self.B
        self.branches = 2 if self.guided else 1  # the rows of the current scale (1 after a cfg-cutoff)
        self.cond: Conditioning = model.condition(model.guided_text(text, negative) if self.guided else text)
        self._cond_rows = self.cond  # the conditioning of the current scale's rows
        self.cfgs, self.taus = params.cfg_list(S), params.tau_list(S)
        self.stop = S if params.trunk_scale is None else min(S, params.trunk_scale)
        self.vae_grids = sched.vae_grids(vae.cfg.patchify)
        self.si = 0
        self.x: torch.Tensor = model.first_tokens(self.cond)
        self.summed: torch.Tensor | None = None
        self.bits: list[torch.Tensor] = []
        self.kv_bytes_peak = 0
        # query rows x tokens each scale ran, times the share of the token work a block hook computes (0: skipped)
        self.rows_x_tokens = [0.0] * S
        self.scratch: dict = {}  # per-request memory of block hooks (FastVAR's cached block updates)

    @property
    def num_scales(self) -> int:
        return self.stop

    @property
    def done(self) -> bool:
        return self.si >= self.stop

    @property
    def tokens(self) -> list[torch.Tensor]:
        return self.bits

    def release(self) -> None:
        if self._release is not None:
            self._release()
        self._release = None

    @torch.inference_mode()
    def step(self) -> ScaleOutput:
        """Sample scale ``si`` (infinity.py:538-622): all blocks over this scale's tokens with guidance on the logits
        or, for ``cfg_insertion_layer=-k``, on the hidden states after block depth-k; logits times 1/tau; one draw
        per bit; the codes added to the running latent, which resampled to the next grid is the next input."""
        assert not self.done, "the request is finished"
        model, B, si = self.model, self.B, self.si
        h, w = self.sched.grids[si]
        guided = self.branches == 2  # both guidance halves run this scale
        cfg, tau = self.cfgs[si] if guided else 1, self.taus[si]
        if isinstance(self.kv, CompactKV):  # a compressed cache decides what it keeps by this scale's plan
            self.kv.step, self.kv.si, self.kv.pn = self.plan.steps[si], si, h if h == w else 0
        layout = CachedScale(self.kv, scale_rope(model.cfg.head_dim, self.sched, si).to(self.x.device))
        k = self.params.cfg_insertion_layer
        x, cond, block_fn = self.x, self._cond_rows, self._block_fn()
        if cfg != 1 and k < 0:
            mix_end = model.depth + k + 1
            x = model.run_blocks(x, cond, layout, 0, mix_end, block_fn)
            x = cfg * x[:B] + (1 - cfg) * x[B:]
            x = model.run_blocks(torch.cat((x, x)), cond, layout, mix_end, block_fn=block_fn)
        else:
            x = model.run_blocks(x, cond, layout, block_fn=block_fn)
        if cfg != 1 and k == 0:
            logits = model.logits(x, cond.cond_RD).mul(1 / tau)
            logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
        else:
            logits = model.logits(x[:B], cond.cond_RD[:B]).mul(1 / tau)
        self.rows_x_tokens[si] = self.x.shape[0] * h * w * self.plan.steps[si].tokens_fraction
        self.kv_bytes_peak = max(self.kv_bytes_peak, int(getattr(self.kv, "nbytes_reserved", 0)))
        top_k = min(self.params.top_k, 2)  # two values per bit: the official sampler clamps top_k to V
        bits_Bhwd = sample_tokens(logits.reshape(B, -1, 2), top_k, self.params.top_p, self.generators)
        bits_Bhwd = bits_Bhwd.reshape(B, h, w, -1)
        self.bits.append(bits_Bhwd)
        codes = bits_to_codes(unpatchify_bits(bits_Bhwd, self.vae.cfg.patchify))
        last = si == self.sched.num_scales - 1
        nxt_si = si + 1
        while nxt_si < self.stop and self.plan.steps[nxt_si].skip:  # skipped scales add nothing to the codes
            nxt_si += 1
        if not last:
            up = upsample_codes(codes, self.vae_grids[-1])
            self.summed = up if self.summed is None else self.summed.add_(up)
            if nxt_si < self.stop:
                if self.branches == 2 and not self.plan.steps[nxt_si].guided:  # cfg-cutoff: conditional rows only
                    self.branches, self._cond_rows = 1, self.cond.select(slice(0, B))
                nxt = latent_to_tokens(self.summed, self.vae_grids[nxt_si], self.vae.cfg.patchify)
                self.x = model.next_tokens(nxt_si, nxt, self.branches)
        else:
            self.summed = codes.clone() if self.summed is None else self.summed.add_(codes)
        self.si = nxt_si
        return ScaleOutput(si, bits_Bhwd, self.summed)

    def _block_fn(self) -> BlockFn | None:
        """This scale's block hook bound to the request (None: the blocks run as they are)."""
        hook = self.plan.steps[self.si].hook
        if hook is None:
            return None
        ctx = HookContext(self.si, self.sched.grids[self.si], self.scratch)

        def block_fn(
            i: int,
            block: CrossAttnBlock,
            x: torch.Tensor,
            mod: torch.Tensor,
            kv_rows: Sequence[torch.Tensor],
            layout: InfinityLayout,
        ) -> torch.Tensor:
            assert isinstance(layout, DenseRows), "block hooks run on dense rows"
            return hook(ctx, i, lambda x_, mod_, layout_: block(x_, mod_, kv_rows, layout_), x, mod, layout)

        return block_fn

    def stats(self) -> dict:
        """What the request cost: query rows x tokens per scale, the KV cache's peak bytes, the plan's methods."""
        return {
            "rows_x_tokens": list(self.rows_x_tokens),
            "kv_bytes_peak": self.kv_bytes_peak,
            "accel": list(self.plan.names),
        }
