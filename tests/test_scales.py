import pytest
import torch

from nextscale.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
from nextscale.errors import ConfigError
from nextscale.models.scales import ScaleSchedule, phi_index_table


def test_release_geometry():
    s = ScaleSchedule(PATCH_NUMS_256)
    assert s.seq_len == 680 and s.first_l == 1 and s.num_scales == 10
    assert [b for b, _ in s.begin_ends] == [0, 1, 5, 14, 30, 55, 91, 155, 255, 424]
    assert ScaleSchedule(PATCH_NUMS_512).seq_len == 2240
    assert VARConfig.official(16).seq_len == 680 and VARConfig.official(36).patch_nums == PATCH_NUMS_512
    assert VQVAEConfig().image_size == 256 and VQVAEConfig(patch_nums=PATCH_NUMS_512).image_size == 512


def test_phi_tables_reproduce_float64_tie_breaking():
    assert phi_index_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_index_table(14, 4) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
    assert phi_index_table(4, 4) == (0, 1, 2, 3)
    assert phi_index_table(10, 10) == tuple(range(10))


def test_block_causal_mask_and_level_ids():
    s = ScaleSchedule((1, 2, 3))
    lvl = s.level_ids()
    assert lvl.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]]
    bias = s.block_causal_bias()[0, 0]
    for q in range(14):
        for k in range(14):
            visible = lvl[0, k] <= lvl[0, q]
            assert (bias[q, k] == 0) if visible else torch.isinf(bias[q, k])


@pytest.mark.parametrize("pns", [(1, 2, 3), PATCH_NUMS_256, PATCH_NUMS_512, (2, 4, 8)])
def test_patch_nums_recovered_from_level_ids(pns):
    assert ScaleSchedule.from_level_ids(ScaleSchedule(pns).level_ids()).patch_nums == pns


def test_level_ids_that_are_not_a_pyramid_are_rejected():
    assert ScaleSchedule.from_level_ids(torch.tensor([[0, 1, 1, 1]])) is None  # 3 is not a square
    assert ScaleSchedule.from_level_ids(torch.tensor([[0, 2, 2, 2, 2]])) is None  # skips a level


@pytest.mark.parametrize("bad", [(4, 2), (1,), (0, 1), (1, 1, 2)])
def test_invalid_patch_nums_are_refused(bad):
    with pytest.raises(ConfigError, match="patch_nums"):
        VARConfig(patch_nums=bad)


def test_config_validation_names_values():
    with pytest.raises(ConfigError, match="multiple of 32"):
        VQVAEConfig(ch=48)
    with pytest.raises(ConfigError, match="divisible"):
        VARConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ConfigError, match="class_names"):
        VARConfig(num_classes=3, class_names=("a", "b"))


def test_config_roundtrip():
    cfg = VARConfig(depth=3, embed_dim=96, num_heads=3, num_classes=2, class_names=("a", "b"), patch_nums=(1, 2))
    assert VARConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown VARConfig fields"):
        VARConfig.from_dict({**cfg.to_dict(), "bogus": 1})
