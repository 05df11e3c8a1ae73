"""Speculative decoding for raster models (engine/raster/speculative.py, accel/speculative.py), tiny LlamaGen models.

The central check: SJD is lossless. On a model with 8 codes and a 2x2 grid, the exact joint distribution of the 4
tokens under plain sampling (guidance with cfg_interval, temperature, top-k, top-p) is enumerated over all 8^4
sequences by teacher forcing, and 20000 SJD samples are compared with it by a chi-square test (cells with expected
count < 5 pooled; pass at p-value >= 1e-3). The same test must reject a classic mistake (drawing a refused slot from
p instead of the residual), so it has power. Then: rule formulas on hand-made distributions, the per-row cached
layout against teacher forcing, image i alone == image i in a batch for every rule, fewer passes than tokens where
guesses get accepted, greedy == sample_raster, spec parsing and one-line errors. ZipAR (a decoding order, lossy):
its own enumerated joint (stand-in token, masks, flush; a missing flush is detected), whole-row waiting is
lossless, pass counts. SJD-PAC's tree of guesses: lossless by the same test, which detects alternatives drawn with
replacement.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from nextscale.accel.speculative import (
    GSD,
    MCSJD,
    SJD,
    SJDPAC,
    ExactRule,
    GroupRule,
    Lantern,
    RelaxedRule,
    SpeculativeConfig,
    group_radius,
    latent_neighbours,
    nearest_codes,
    parse_speculative,
)
from nextscale.engine.raster.row_kv import RowKV, RowWindows
from nextscale.engine.raster.sampler import RasterParams, RasterStep, cfg_guide, filter_logits_, sample_raster
from nextscale.engine.raster.speculative import fresh_guesses, sample_inverse_cdf, sample_speculative
from nextscale.errors import InvalidInputError
from nextscale.models.llamagen import LlamaGen

from .conftest import tiny_llamagen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LlamaGen:
    return tiny_llamagen(0)


LABELS = torch.tensor([3, 7, 1])


# ---- SJD is lossless: enumerated joint distribution vs samples ------------------------------------------------
V8, L4, LABEL, SAMPLES = 8, 4, 3, 20000
DIST_PARAMS = RasterParams(cfg_scale=1.5, cfg_interval=1, temperature=1.5, top_k=6, top_p=0.9, seed=3)


@pytest.fixture(scope="module")
def small() -> LlamaGen:
    """8 codes, 2x2 grid. Token embeddings share one direction with a little per-code spread, so the model depends
    only weakly on earlier tokens: Jacobi guesses are often kept (about 1.8 tokens per pass of the 2 possible) and
    both the keep and the refuse paths are exercised."""
    m = tiny_llamagen(6, dim=16, n_head=2, vocab_size=V8, image_size=32, ffn_hidden=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.tok_embeddings.weight.copy_(torch.randn(1, 16, generator=g) + 0.2 * torch.randn(V8, 16, generator=g))
    return m


@pytest.fixture(scope="module")
def exact_joint(small) -> torch.Tensor:
    """P(x_0..x_3) under plain sampling for every one of the 8^4 sequences, float64 [4096] (row-major codes)."""
    X = torch.tensor(list(itertools.product(range(V8), repeat=L4)))
    with torch.no_grad():
        cond = small(X, torch.full((len(X),), LABEL))
        uncond = small(X, torch.full((len(X),), small.cfg.null_class))
    logp = torch.zeros(len(X), dtype=torch.float64)
    for t in range(L4):
        guided = DIST_PARAMS.guided_at(t)
        logits = cfg_guide(torch.cat((cond[:, t], uncond[:, t])), DIST_PARAMS.cfg_scale) if guided else cond[:, t]
        p = filter_logits_(logits.clone(), DIST_PARAMS.temperature, DIST_PARAMS.top_k, DIST_PARAMS.top_p).softmax(-1)
        logp += p.gather(1, X[:, t : t + 1]).squeeze(1).double().log()
    joint = logp.exp()  # products of float32 probabilities: sums to 1 within ~1e-7
    assert abs(float(joint.sum()) - 1) < 1e-5 and int((joint > 0).sum()) > 200  # a broad target
    return joint


def chi_square(tokens_BL: torch.Tensor, joint: torch.Tensor) -> tuple[float, int, float, int]:
    """Pearson's statistic against ``joint`` with cells of expected count < 5 pooled into one; (X², df, p-value,
    samples outside the support)."""
    idx = (tokens_BL * V8 ** torch.arange(L4 - 1, -1, -1)).sum(1)
    counts = torch.bincount(idx, minlength=V8**L4).double()
    expected = joint * len(tokens_BL)
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum().view(1)))
    exp = torch.cat((expected[big], expected[~big].sum().view(1)))
    x2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x2 / 2)))
    return x2, df, p_value, int(counts[joint == 0].sum())


class RefuseAll(ExactRule):
    """Keeps no guess: every pass draws its first slot from p — plain sampling whatever the window."""

    def accept_prob(self, p_MV, q_MV, draft_M):
        return torch.zeros(len(draft_M))

    def residual(self, p_MV, q_MV, draft_M):
        return p_MV


class ResidualIsTarget(ExactRule):
    """A classic mistake: draw a refused slot from p instead of max(0, p - q). Biased; the test must see it."""

    def residual(self, p_MV, q_MV, draft_M):
        return p_MV


def broken_coupling(p_NlV, q_NlV, draft_Nl, coin_Nl, u_Nl):
    """MC-SJD done wrong: a guess is never redrawn, though it is then tested as if drawn from its new target p (which
    the loop records as its q). It does not follow p: the test must see it."""
    return draft_Nl


@pytest.mark.parametrize(
    "rule, window, min_accepted",
    [
        (ExactRule(), 4, 1.7),
        (ExactRule("repeat"), 3, 1.7),
        (ExactRule(coupled=True), 4, 1.7),
        (ExactRule("repeat", coupled=True), 3, 1.7),
        (ExactRule(), 1, 1.0),
        (RefuseAll(), 4, 1.0),
    ],
    ids=["sjd-window4", "sjd-window3-repeat", "mcsjd-window4", "mcsjd-window3-repeat", "window1", "refuse-all"],
)
def test_lossless_rules_sample_the_exact_joint_distribution(small, exact_joint, rule, window, min_accepted):
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, rule, window)
    x2, df, p_value, outside = chi_square(res.tokens_BL, exact_joint)
    assert outside == 0, f"{outside} samples the target cannot produce"
    assert p_value >= 1e-3, f"chi-square {x2:.1f} on {df} df (p = {p_value:.2e}): not the target distribution"
    assert res.stats["mean_accepted"] >= min_accepted  # the speculative path really ran
    if window == 1:  # one slot per pass: its guess may be kept, but a pass never fixes more than one token
        assert res.stats["forward_passes"] == L4 and res.stats["mean_accepted"] == 1.0


def test_the_distribution_test_detects_a_biased_rule(small, exact_joint):
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, ResidualIsTarget(), 4)
    _, _, p_value, _ = chi_square(res.tokens_BL, exact_joint)
    assert p_value < 1e-20


def test_the_distribution_test_detects_a_broken_coupling(small, exact_joint, monkeypatch):
    from nextscale.engine.raster import speculative

    monkeypatch.setattr(speculative, "coupled_redraw", broken_coupling)
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, ExactRule(coupled=True), 4)
    _, _, p_value, _ = chi_square(res.tokens_BL, exact_joint)
    assert p_value < 1e-6


def test_coupled_redraw_keeps_the_old_guess_as_often_as_the_target_allows():
    """The maximal coupling: where p = q the guess never changes; in general it stays with probability
    Σ min(p, q) and the new guess follows p (the output distribution over many coins, computed exactly here)."""
    from nextscale.engine.raster.speculative import coupled_redraw

    V, M = 6, 20000
    g = torch.Generator().manual_seed(0)
    p, q = (2 * torch.randn(1, 1, V, generator=g)).softmax(-1), (2 * torch.randn(1, 1, V, generator=g)).softmax(-1)
    old = sample_inverse_cdf(q.view(1, V).expand(M, V), torch.rand(M, dtype=torch.float64, generator=g)).view(M, 1)
    coin, u = torch.rand(M, 1, dtype=torch.float64, generator=g), torch.rand(M, 1, dtype=torch.float64, generator=g)
    same = coupled_redraw(q.expand(M, 1, V), q.expand(M, 1, V), old, coin, u)
    assert torch.equal(same, old), "an unchanged target keeps every guess"
    new = coupled_redraw(p.expand(M, 1, V), q.expand(M, 1, V), old, coin, u)
    stay = float((new == old).double().mean())
    assert abs(stay - float(torch.minimum(p, q).sum())) < 0.015  # the coupling's stay probability, Σ min(p, q)
    freq = torch.bincount(new.view(-1), minlength=V).double() / M
    assert (freq - p.view(-1).double()).abs().max() < 0.015, "the new guess follows p"


# ---- SJD-PAC: a tree of guesses -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, window, zipar",
    [
        (ExactRule(coupled=True, tree=3, depth=2), 3, 0),
        (ExactRule(tree=4, depth=1), 4, 0),
        (ExactRule("repeat", coupled=True, tree=2, depth=3), 4, 0),
        (ExactRule(coupled=True, tree=3, depth=2), 2, 2),
    ],
    ids=["sjd-pac", "tree-no-coupling", "deep-repeat", "sjd-pac-whole-rows"],
)
def test_tree_drafting_samples_the_exact_joint_distribution(small, exact_joint, rule, window, zipar):
    """Several guesses per slot, tested in order by recursive rejection sampling without replacement: lossless; and
    the second and later guesses do get kept (more guesses kept per pass than the same rule's chain)."""
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, rule, window, zipar=zipar)
    x2, df, p_value, outside = chi_square(res.tokens_BL, exact_joint)
    assert outside == 0 and p_value >= 1e-3, f"chi-square {x2:.1f} on {df} df (p = {p_value:.2e})"
    if rule.tree == 3 and not zipar:
        chain = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, replace(rule, tree=1), window)
        assert res.stats["accepted_drafts"] > chain.stats["accepted_drafts"] + 0.02  # measured: 1.02 against 0.96


def test_the_distribution_test_detects_alternatives_drawn_with_replacement(small, exact_joint, monkeypatch):
    """Power: a second guess may repeat the first if drawn with replacement, but the test's q (the first removed)
    says it cannot — it is then kept for sure. The chi-square test must see the bias."""
    from nextscale.engine.raster import tree

    real = tree.draw_without
    monkeypatch.setattr(tree, "draw_without", lambda q, taken, u: real(q, torch.zeros_like(taken), u))
    rule = ExactRule(coupled=True, tree=3, depth=2)
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, rule, 3)
    _, _, p_value, _ = chi_square(res.tokens_BL, exact_joint)
    assert p_value < 1e-6


def test_tree_template_shape():
    """K = 3 guesses per parent at 2 slots of a 5-slot window: fed nodes are the root, the 3 first-slot guesses and
    the main path from slot 1 on (not the last slot's); candidates 3 + 9 + 3 chain slots."""
    from nextscale.engine.raster.tree import tree_template

    t = tree_template(3, 2, 5)
    assert t.fed == 1 + 3 + 3 and t.candidates == 3 + 9 + 3
    assert t.slot_F == (-1, 0, 0, 0, 1, 2, 3)
    assert t.child_fed_FK[0].tolist() == [1, 2, 3] and t.child_fed_FK[2].tolist() == [-1, -1, -1]  # leaves
    assert t.child_fed_FK[1].tolist() == [4, -1, -1], "only the main path goes on"
    assert t.ancestor_FF[6].nonzero().view(-1).tolist() == [0, 1, 4, 5, 6]
    assert t.main_fed_w.tolist() == [1, 4, 5, 6, -1]
    chain = tree_template(1, 0, 4)
    assert chain.fed == 4 and chain.slot_F == (-1, 0, 1, 2) and chain.candidates == 4


# ---- ZipAR: the decoding order ------------------------------------------------------------------------------------
def _target(logits_cond, logits_null, t: int) -> torch.Tensor:
    """Plain sampling's distribution of token t (``DIST_PARAMS``) from teacher-forcing logits."""
    guided = DIST_PARAMS.guided_at(t)
    logits = cfg_guide(torch.cat((logits_cond, logits_null)), DIST_PARAMS.cfg_scale) if guided else logits_cond
    return filter_logits_(logits.clone(), DIST_PARAMS.temperature, DIST_PARAMS.top_k, DIST_PARAMS.top_p).softmax(-1)


@pytest.fixture(scope="module")
def zipar_joint(small) -> torch.Tensor:
    """The joint of ZipAR with a 1-token window on the 2x2 grid, by teacher forcing, as the official code conditions
    it. Pass 1 draws t0. Pass 2: row 0 draws t1 from [cls, t0]; row 1 starts, and the input before its first token
    is t1, not drawn yet: a stand-in, the row above's last token (t0), at t1's position — t2 is drawn from
    [cls, t0, t0]. Pass 3: t1's true keys replace the stand-in's (the flush), so t3 is drawn from [cls, t0, t1, t2]."""
    X = torch.tensor(list(itertools.product(range(V8), repeat=L4)))
    stand_in = X.clone()
    stand_in[:, 1] = X[:, 0]
    with torch.no_grad():
        cond, null = (small(X, torch.full((len(X),), c)) for c in (LABEL, small.cfg.null_class))
        cond2, null2 = (small(stand_in, torch.full((len(X),), c)) for c in (LABEL, small.cfg.null_class))
    logp = torch.zeros(len(X), dtype=torch.float64)
    for t in range(L4):
        p = _target(cond2[:, t], null2[:, t], t) if t == 2 else _target(cond[:, t], null[:, t], t)
        logp += p.gather(1, X[:, t : t + 1]).squeeze(1).double().log()
    return logp.exp()


@pytest.mark.parametrize("rule", [ExactRule(), ExactRule(tree=3)], ids=["chain", "deferred-writes"])
def test_zipar_samples_its_own_conditioning(small, zipar_joint, exact_joint, rule):
    """Plain ZipAR (window 1, each row one token per pass) against the enumerated joint of its conditioning: the
    stand-in token, the masks (row 1 never sees row 0's unfixed slot) and the flush are all in it. A tree rule (one
    slot: no tree yet) runs the same with its keys written after the pass instead of during it."""
    assert float((zipar_joint - exact_joint).abs().sum()) / 2 > 0.02, "ZipAR's target differs from raster order"
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, rule, 1, zipar=1)
    x2, df, p_value, outside = chi_square(res.tokens_BL, zipar_joint)
    assert outside == 0 and p_value >= 1e-3, f"chi-square {x2:.1f} on {df} df (p = {p_value:.2e})"
    assert res.stats["forward_passes"] == 3  # rows of 2 tokens, the second starting one token later


def test_zipar_without_the_flush_is_detected(small, zipar_joint, monkeypatch):
    """Power: if row 0's last token never replaced its stand-in, t3 would see the stand-in's keys."""
    from nextscale.engine.raster.speculative import _Batch

    real_init = _Batch.__init__

    def no_flush(self, *a, **k):
        real_init(self, *a, **k)
        self.flush_NG = _NeverTrue(self.flush_NG)

    monkeypatch.setattr(_Batch, "__init__", no_flush)
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, ExactRule(), 1, zipar=1)
    _, _, p_value, _ = chi_square(res.tokens_BL, zipar_joint)
    assert p_value < 1e-6


class _NeverTrue(torch.Tensor):
    """A flag tensor that drops every write of True (the flush never gets scheduled)."""

    @staticmethod
    def __new__(cls, t):
        return torch.Tensor._make_subclass(cls, t.clone())

    def __setitem__(self, idx, value):
        pass

    def __getitem__(self, idx):
        return _NeverTrue(torch.Tensor.__getitem__(self.as_subclass(torch.Tensor), idx))


@pytest.mark.parametrize("rule, window", [(ExactRule(), 2), (ExactRule(coupled=True), 3), (ExactRule(), 1)])
def test_zipar_waiting_for_whole_rows_is_raster_order_and_lossless(small, exact_joint, rule, window):
    """A row that starts only when the row above is complete conditions on every earlier token: the lanes, their
    masks and the acceptance rule together sample the exact joint."""
    res = sample_speculative(small, torch.full((SAMPLES,), LABEL), DIST_PARAMS, rule, window, zipar=2)
    x2, df, p_value, outside = chi_square(res.tokens_BL, exact_joint)
    assert outside == 0 and p_value >= 1e-3, f"chi-square {x2:.1f} on {df} df (p = {p_value:.2e})"


def test_deferred_key_writes_equal_writes_during_the_pass(model):
    """A tree rule writes a pass's keys after verification (the roots — fixed tokens, stand-ins, flushes — and the
    kept guesses). Greedy targets make the tokens a function of what each query sees: in raster order every rule
    gives sample_raster's tokens, and ZipAR with one-token windows (whose schedule does not depend on the draws)
    gives the chain's over several rows (a flush not written leaves the stand-in's keys for the rows below)."""
    params = RasterParams(cfg_scale=2.0, cfg_interval=5, top_k=1, seed=0)
    tree = ExactRule(coupled=True, tree=3)
    assert torch.equal(
        sample_speculative(model, LABELS, params, tree, 5).tokens_BL, sample_raster(model, LABELS, params).tokens_BL
    )
    chain = sample_speculative(model, LABELS, params, ExactRule(), 1, zipar=2).tokens_BL
    assert torch.equal(sample_speculative(model, LABELS, params, tree, 1, zipar=2).tokens_BL, chain)


@pytest.mark.parametrize("zipar", [1, 2, 4])
def test_plain_zipar_makes_one_pass_per_token_of_the_longest_chain(model, zipar):
    """With one-token windows row r starts ``zipar`` passes after row r-1, and each row takes a pass per token:
    (rows - 1)·zipar + row length passes; greedy with zipar >= the row length is sample_raster's greedy."""
    grid = model.cfg.grid_size
    params = RasterParams(cfg_scale=2.0, cfg_interval=5, top_k=50, seed=4)
    res = sample_speculative(model, LABELS, params, ExactRule(), 1, zipar=zipar)
    assert res.stats["forward_passes_per_image"] == [(grid - 1) * zipar + grid] * len(LABELS)
    greedy = RasterParams(cfg_scale=2.0, top_k=1, seed=0)
    whole_rows = sample_speculative(model, LABELS, greedy, ExactRule(), 3, zipar=grid)
    assert torch.equal(whole_rows.tokens_BL, sample_raster(model, LABELS, greedy).tokens_BL)


# ---- the rules' formulas -------------------------------------------------------------------------------------------
def _random_dists(M: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = (3 * torch.randn(M, V, generator=g)).softmax(-1)
    q = (3 * torch.randn(M, V, generator=g)).softmax(-1)
    return p, q


def _output_given_draft(rule, p_MV, q_MV, x_M) -> torch.Tensor:
    """Distribution [M, V] of the fixed token when guess x is tested: a·δ_x + (1 - a)·residual/|residual|."""
    a = rule.accept_prob(p_MV, q_MV, x_M)
    r = rule.residual(p_MV, q_MV, x_M)
    r = torch.where(r.sum(-1, keepdim=True) > 0, r, p_MV)
    out = (1 - a)[:, None] * r / r.sum(-1, keepdim=True)
    return out.scatter_add(1, x_M[:, None], a[:, None])


def test_exact_rule_keeps_the_target_for_guesses_drawn_from_q():
    """Σ_x q(x)·out(·|x) = p exactly: the speculative-sampling identity, over every possible guess."""
    V = 12
    p, q = _random_dists(1, V, 0)
    xs = torch.arange(V)
    out = _output_given_draft(ExactRule(), p.expand(V, V), q.expand(V, V), xs)
    torch.testing.assert_close((q[0][:, None] * out).sum(0), p[0], atol=1e-6, rtol=0)
    one_hot = torch.zeros(V, V).scatter_(1, xs[:, None], 1.0)  # a deterministic guess is exact too
    torch.testing.assert_close(_output_given_draft(ExactRule(), p.expand(V, V), one_hot, xs), p.expand(V, V))


def test_lantern_moves_at_most_delta_onto_the_guess():
    V, delta = 16, 0.15
    p, _ = _random_dists(V, V, 1)
    xs = torch.arange(V)
    one_hot = torch.zeros(V, V).scatter_(1, xs[:, None], 1.0)
    table = nearest_codes(torch.randn(V, 3, generator=torch.Generator().manual_seed(2)), k=5)
    assert table.shape == (V, 5) and not (table == xs[:, None]).any()  # never its own neighbour
    exact = ExactRule()
    relaxed = RelaxedRule("random", table, delta)
    out = _output_given_draft(relaxed, p, one_hot, xs)
    tv = 0.5 * (out - p).abs().sum(-1)
    assert bool((tv <= delta + 1e-6).all()) and bool((tv > 0).any())
    assert bool((relaxed.accept_prob(p, one_hot, xs) >= exact.accept_prob(p, one_hot, xs)).all())
    none = RelaxedRule("random", table, 0.0)  # delta 0 is SJD
    torch.testing.assert_close(none.accept_prob(p, one_hot, xs), exact.accept_prob(p, one_hot, xs))
    torch.testing.assert_close(none.residual(p, one_hot, xs), exact.residual(p, one_hot, xs))


def test_gsd_accepts_on_the_mass_of_the_group():
    # Codes 0..5; the guess is code 2. By target rank (ascending) the order is 5, 4, 3, 2, 1, 0.
    p = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.05, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.9, 0.1, 0.0, 0.0]])
    emb = torch.tensor([[0.0], [0.3], [0.0], [0.5], [5.0], [0.1]])  # squared distances to code 2: .09, .25, 25, .01
    x = torch.tensor([2])
    rule = GroupRule("random", emb, size=1, pdiff=0.15, dist=0.5)  # ranks r-1 .. r: codes 3 and 2
    # Group {3, 2}: |0.10 - 0.20| < 0.15 and 0.25 < 0.5 -> (0.2 + 0.1) / (0.9 + 0.1).
    torch.testing.assert_close(rule.accept_prob(p, q, x), torch.tensor([0.3]))
    wide = GroupRule("random", emb, size=2, pdiff=0.15, dist=0.5)  # ranks r-2 .. r+1: codes 4, 3, 2, 1
    # Code 4 is too far in embedding space; code 1 is close enough (|0.25 - 0.2| < 0.15, 0.09 < 0.5).
    torch.testing.assert_close(wide.accept_prob(p, q, x), torch.tensor([0.55 / 1.0]))
    tight = GroupRule("random", emb, size=2, pdiff=0.01, dist=0.5)  # nothing close in probability: SJD's ratio
    torch.testing.assert_close(tight.accept_prob(p, q, x), ExactRule().accept_prob(p, q, x))


def test_gsd_default_distance_is_the_codebooks_own_neighbourhood():
    """The default ``dist`` is scale-free: the median squared distance to a code's ``2·size``-th nearest code."""
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # 2nd-nearest distances²: 9, 4, 9, 36 -> median 9
    assert group_radius(line, 1) == 1.0 and group_radius(line, 2) == 9.0
    assert group_radius(10 * line, 2) == pytest.approx(900.0), "scales with the table"
    model = tiny_llamagen()
    emb = model.tok_embeddings.weight
    rule = GSD(size=3).rule(model)
    assert isinstance(rule, GroupRule) and rule.dist == pytest.approx(group_radius(emb, 6))
    assert GSD(dist=0.5).rule(model).dist == 0.5 and GSD().spec() == "gsd", "a given number is used as it is"


def test_repeat_guesses_copy_the_left_neighbour_in_the_grid():
    # 4-wide grid, n = 6 (column 2): slots are tokens 6, 7 | 8, 9 (token 8 starts a row: a random code).
    draft = torch.tensor([[50, 0, 0, 0]])
    fresh = torch.tensor([[False, True, True, True]])
    u = torch.tensor([[0.0, 0.5, 0.25, 0.75]])
    out = fresh_guesses("repeat", u, fresh, draft, torch.tensor([9]), torch.tensor([6]), 100, 4)
    assert out.tolist() == [[50, 50, 25, 25]]
    out = fresh_guesses("random", u, fresh, draft, torch.tensor([9]), torch.tensor([6]), 100, 4)
    assert out.tolist() == [[50, 50, 25, 75]]


# ---- the per-row layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"dim": 64, "n_head": 4, "n_kv_head": 2}], ids=["mha", "gqa"])
def test_rows_at_different_positions_equal_teacher_forcing(kw):
    """Rows keep different numbers of tokens; what a row refused is garbage in its cache, which later calls must
    never see. Every row's logits equal the one-pass causal logits at its own positions."""
    m = tiny_llamagen(1, **kw)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, m.vocab_size, (3, 36), generator=g)
    table = m.rope(0, m.cfg.num_positions, torch.device("cpu"))
    with torch.no_grad():
        full = m(idx, LABELS)
        kv = RowKV.allocate(m, 3, 36 + 8)
        pos = torch.zeros(3, dtype=torch.long)
        first = m.forward_tokens(
            torch.cat((m.embed_classes(LABELS), m.embed_tokens(idx[:, :3])), 1), RowWindows.windows(kv, pos, 4, table)
        )
        torch.testing.assert_close(first, full[:, :4], atol=2e-5, rtol=1e-5)
        pos = torch.full((3,), 4)
        kept = torch.tensor([2, 5, 0])  # of the 5 positions 4..8, rows keep 2, 5 and 0 (the rest: garbage)
        fed = idx[:, 3:8].clone()
        garbage = torch.arange(5) >= kept[:, None]
        fed[garbage] = torch.randint(0, m.vocab_size, (int(garbage.sum()),), generator=g)
        m.forward_tokens(m.embed_tokens(fed), RowWindows.windows(kv, pos, 5, table))
        pos = pos + kept
        out = m.forward_tokens(
            m.embed_tokens(torch.stack([idx[r, p - 1 : p + 6] for r, p in enumerate(pos.tolist())])),
            RowWindows.windows(kv, pos, 7, table),
        )
        for r, p in enumerate(pos.tolist()):
            torch.testing.assert_close(out[r], full[r, p : p + 7], atol=5e-5, rtol=1e-5)


def test_windows_running_off_the_grid_store_nothing_past_it():
    """A cache of exactly L positions (the serving engine's pool rows): rows whose window runs past the grid write
    only the positions inside it, and every valid position still equals the one-pass causal logits."""
    m = tiny_llamagen(1)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, m.vocab_size, (3, 36), generator=g)
    table = m.rope(0, m.cfg.num_positions, torch.device("cpu"))
    with torch.no_grad():
        full = m(idx, LABELS)
        kv = RowKV.allocate(m, 3, 36)
        x = torch.cat((m.embed_classes(LABELS), m.embed_tokens(idx[:, :33])), 1)
        m.forward_tokens(x, RowWindows.windows(kv, torch.zeros(3, dtype=torch.long), 34, table))
        pos = torch.tensor([30, 31, 33])  # windows of 6: positions up to 35, 36 and 38
        pad = torch.randint(0, m.vocab_size, (3, 3), generator=g)
        fed = torch.stack([torch.cat((idx[r, p - 1 :], pad[r]))[:6] for r, p in enumerate(pos.tolist())])
        out = m.forward_tokens(m.embed_tokens(fed), RowWindows.windows(kv, pos, 6, table))
    for r, p in enumerate(pos.tolist()):
        torch.testing.assert_close(out[r, : 36 - p], full[r, p:36], atol=5e-5, rtol=1e-5)


# ---- sampling --------------------------------------------------------------------------------------------------------
RULES = [
    "sjd:window=6",
    "sjd:window=5,init=repeat",
    "gsd:window=6,dist=60,pdiff=0.2",
    "lantern:window=6,k=50",
    "zipar:window=2+mcsjd:window=4,init=repeat",
    "sjd-pac:window=6,tree=3",
]


@pytest.mark.parametrize("spec", RULES)
def test_image_does_not_depend_on_its_batch(model, spec):
    cfg = parse_speculative(spec)
    params = RasterParams(cfg_scale=2.0, cfg_interval=8, top_k=100, top_p=0.95, seed=21)
    batch = cfg.sample(model, LABELS, params)
    for i in range(3):
        alone = cfg.sample(model, LABELS[i : i + 1], params, params.generators(1, start=i))
        assert torch.equal(alone.tokens_BL[0], batch.tokens_BL[i]), f"image {i} changed with its batch"
        assert alone.stats["forward_passes_per_image"] == [batch.stats["forward_passes_per_image"][i]]
    other = cfg.sample(model, LABELS, RasterParams(cfg_scale=2.0, cfg_interval=8, top_k=100, top_p=0.95, seed=22))
    assert not torch.equal(other.tokens_BL, batch.tokens_BL)
    assert all(len(set(row.tolist())) > 10 for row in batch.tokens_BL)  # really sampled


@pytest.mark.parametrize("cfg_interval", [-1, 6])
def test_greedy_target_gives_the_plain_greedy_tokens(model, cfg_interval):
    """With top_k = 1 the target is one-hot: whatever the guesses, the tokens are sample_raster's."""
    params = RasterParams(cfg_scale=3.0, cfg_interval=cfg_interval, top_k=1, seed=0)
    plain = sample_raster(model, LABELS, params).tokens_BL
    for window in (1, 4, 16):
        assert torch.equal(sample_speculative(model, LABELS, params, ExactRule(), window).tokens_BL, plain)


def test_guesses_get_accepted_where_the_model_allows_it():
    """A 16x16 grid (256 tokens) whose predictions do not depend on earlier tokens (zero token embeddings): after a
    pass, the Jacobi guesses are drawn from the exact targets and kept, so passes << 256."""
    m = tiny_llamagen(0, image_size=256)
    with torch.no_grad():
        m.tok_embeddings.weight.zero_()
    params = RasterParams(cfg_scale=2.0, top_k=50, seed=1)
    res = parse_speculative("sjd:window=16").sample(m, torch.tensor([3, 7]), params)
    stats = res.stats
    assert set(stats) >= {"forward_passes", "mean_accepted", "forward_passes_per_image", "accepted_drafts", "calls"}
    assert stats["forward_passes"] < 40 and stats["mean_accepted"] > 6  # about 8.3 tokens per pass here
    assert stats["calls"] == max(stats["forward_passes_per_image"])
    assert res.tokens_BL.shape == (2, 256)
    lossy = parse_speculative("lantern:window=16,delta=0.5,k=20").sample(m, torch.tensor([3, 7]), params)
    assert lossy.stats["forward_passes"] <= stats["forward_passes"]


def test_relaxed_rules_keep_more_guesses(model):
    params = RasterParams(cfg_scale=2.0, top_k=50, seed=5)
    labels = torch.tensor([1, 2, 3, 4])
    exact = parse_speculative("sjd:window=6").sample(model, labels, params)
    relaxed = parse_speculative("lantern:window=6,k=50,delta=0.4").sample(model, labels, params)
    assert relaxed.stats["forward_passes"] < exact.stats["forward_passes"]


@pytest.mark.parametrize("spec", ["sjd:window=4", "zipar:window=2+sjd:window=3"])
def test_on_step_reports_every_token_in_raster_order(model, spec):
    seen: list[RasterStep] = []
    params = RasterParams(cfg_scale=2.0, cfg_interval=5, top_k=20, seed=2)
    res = parse_speculative(spec).sample(model, LABELS, params, on_step=seen.append)
    assert [s.t for s in seen] == list(range(36))
    assert [s.guided for s in seen] == [t <= 6 for t in range(36)]
    assert torch.equal(torch.stack([s.idx_B for s in seen], 1), res.tokens_BL)


def test_official_rng_runs_and_is_seeded(model):
    params = RasterParams(cfg_scale=2.0, top_k=20, seed=2, rng="official")
    a = parse_speculative("gsd:window=4").sample(model, LABELS, params)
    b = parse_speculative("gsd:window=4").sample(model, LABELS, params)
    assert torch.equal(a.tokens_BL, b.tokens_BL)


# ---- configs, specs, errors ----------------------------------------------------------------------------------------
def test_parse_specs_and_round_trip():
    assert parse_speculative("sjd") == SJD() and SJD().window == 16 and SJD.lossless
    assert parse_speculative("sjd:window=8") == SJD(window=8)
    assert parse_speculative(" lantern: delta=0.1, k=100 ") == Lantern(delta=0.1, k=100)
    assert parse_speculative("gsd:size=3,dist=2,init=repeat") == GSD(size=3, dist=2.0, init="repeat")
    cfg = GSD(window=4, pdiff=0.3)
    assert parse_speculative(cfg) is cfg
    assert parse_speculative("mcsjd") == MCSJD() and MCSJD().coupled and MCSJD.lossless
    assert parse_speculative("sjd:coupled=1").rule(None) == MCSJD().rule(None) == ExactRule(coupled=True)
    for c in (SJD(), SJD(window=3, init="repeat"), GSD(size=2), Lantern(delta=0.2, k=7, window=5), MCSJD(window=4)):
        assert parse_speculative(c.spec()) == c
    assert Lantern(k=7).spec() == "lantern:k=7" and not Lantern.lossless and not GSD.lossless
    # ZipAR is an order, not a rule: alone it is one-guess windows; with a method, that method per grid row.
    assert parse_speculative("zipar") == SJD(window=1, zipar=8) and SJD(window=1, zipar=8).spec() == "zipar"
    assert parse_speculative("zipar:window=4+sjd:window=8") == SJD(window=8, zipar=4)
    assert parse_speculative("mcsjd + zipar:window=2") == MCSJD(zipar=2)
    assert parse_speculative("zipar:window=3+balanced").zipar == 3  # a preset's method in that order
    for c in (SJD(window=1, zipar=4), SJD(zipar=2), GSD(size=2, zipar=3), MCSJD(window=4, zipar=5)):
        assert parse_speculative(c.spec()) == c
    assert MCSJD(zipar=2).spec() == "zipar:window=2+mcsjd"
    assert parse_speculative("sjd-pac") == SJDPAC() and SJDPAC().coupled and SJDPAC().tree == 4 and SJDPAC.lossless
    assert SJDPAC().rule(None) == ExactRule(coupled=True, tree=4, depth=2)
    assert parse_speculative("zipar:window=3+sjd-pac:tree=3").spec() == "zipar:window=3+sjd-pac:tree=3"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("medusa", "unknown speculative method 'medusa'; available: gsd, lantern, mcsjd, sjd"),
        ("sjd:windw=4", "bad option 'windw=4'; options are key=value with key in: window, init, coupled, tree, depth"),
        ("sjd:window", "bad option 'window'"),
        ("lantern:k=many", "option k='many' is not a valid int"),
        ("lantern:delta=x", "option delta='x' is not a valid float"),
        ("sjd:window=0", "window must be an int >= 1"),
        ("sjd:init=copy", "init must be one of random, repeat"),
        ("lantern:delta=-1", "lantern: k must be >= 1 and delta >= 0"),
        ("gsd:size=0", "gsd: size must be >= 1"),
        ("zipar:window=0+sjd", "zipar: window must be an int >= 1"),
        ("zipar+zipar", "at most one zipar part and one method"),
        ("sjd+gsd", "one method, optionally with a zipar order"),
        ("zipar:rows=2", "zipar: bad option 'rows=2'; options are key=value with key in: window"),
        ("sjd-pac:tree=9", "tree must be an int in 1..8 and depth >= 1"),
        ("sjd-pac:tree=8,depth=4", "a tree of 8\\^4 leaves is too big"),
    ],
)
def test_bad_specs_give_one_line_errors(spec, match):
    with pytest.raises(InvalidInputError, match=match) as err:
        parse_speculative(spec)
    assert "\n" not in str(err.value)


def test_bad_calls_are_refused(model):
    params = RasterParams(seed=0)
    with pytest.raises(InvalidInputError, match="window must be an int >= 1"):
        sample_speculative(model, LABELS, params, ExactRule(), 0)
    with pytest.raises(InvalidInputError, match="class labels"):
        sample_speculative(model, torch.tensor([99]), params, ExactRule(), 4)
    with pytest.raises(InvalidInputError, match="codebook must be"):
        Lantern().rule(model, torch.zeros(3, 8))
    with pytest.raises(InvalidInputError, match="spec string"):
        parse_speculative(16)  # type: ignore[arg-type]


def test_latent_neighbours_are_cached_per_model_and_source(model):
    a = latent_neighbours(model, model.tok_embeddings.weight, 20)
    assert latent_neighbours(model, model.tok_embeddings.weight, 20) is a
    rule = Lantern(k=20).rule(model)
    assert isinstance(rule, RelaxedRule) and rule.neighbours_Vk is a
    codebook = torch.randn(model.vocab_size, 8, generator=torch.Generator().manual_seed(0))
    b = Lantern(k=20).rule(model, codebook)
    assert isinstance(b, RelaxedRule) and torch.equal(b.neighbours_Vk, nearest_codes(codebook, 20))
    codebook.mul_(-1).add_(1)  # changed in place: the table is recomputed
    c = Lantern(k=20).rule(model, codebook)
    assert isinstance(c, RelaxedRule) and c.neighbours_Vk is not b.neighbours_Vk
    with pytest.raises(NotImplementedError):
        SpeculativeConfig().rule(model)
