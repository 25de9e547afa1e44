"""Mask mods (VARIANTS.md §8) against masks built by explicit python loops over (i, j)."""

import pytest
import torch

from attncc.codegen.masks import (
    and_masks,
    causal,
    dense_mask,
    or_masks,
    padding,
    power,
    sliding_window,
)


def loop_mask(allowed, Tq, Tk):
    return torch.tensor([[bool(allowed(i, j)) for j in range(Tk)] for i in range(Tq)])


def is_power_of_two_or_zero(d):
    return d == 0 or (d > 0 and (d & (d - 1)) == 0)


def allowed_power(i, j, block, window_blocks):
    distance = i // block - j // block
    return j <= i and (distance < window_blocks or is_power_of_two_or_zero(distance) or j < block)


CASES = [
    pytest.param(causal(), lambda i, j: j <= i, "causal", id="causal"),
    pytest.param(
        sliding_window(4, 2),
        lambda i, j: j <= i and (i - j < 4 or j < 2),
        "sliding_window_4_sinks_2",
        id="swa-4-2",
    ),
    pytest.param(
        sliding_window(1024, 4), lambda i, j: j <= i, "sliding_window_1024_sinks_4", id="swa-wider-than-T"
    ),
    pytest.param(
        power(3, 2), lambda i, j: allowed_power(i, j, 3, 2), "power_block_3_window_2", id="power-3-2"
    ),
    pytest.param(
        power(1, 5), lambda i, j: allowed_power(i, j, 1, 5), "power_block_1_window_5", id="power-1-5"
    ),
]


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (7, 7), (63, 63), (5, 9)], ids=["T1", "T7", "T63", "Tq5-Tk9"])
@pytest.mark.parametrize("mask_mod,allowed,name", CASES)
def test_mask_mod_matches_loop(mask_mod, allowed, name, Tq, Tk):
    assert mask_mod.__name__ == name
    mask = dense_mask(mask_mod, None, None, Tq, Tk)
    assert mask.shape == (1, 1, Tq, Tk) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], loop_mask(allowed, Tq, Tk))


def test_combinators_and_broadcast_shapes():
    window, sinks = sliding_window(3, 1), power(2, 1)
    both, either = and_masks(window, sinks), or_masks(window, sinks)
    assert both.__name__ == "sliding_window_3_sinks_1_and_power_block_2_window_1"
    assert either.__name__ == "sliding_window_3_sinks_1_or_power_block_2_window_1"
    a, b = dense_mask(window, None, None, 20, 20), dense_mask(sinks, None, None, 20, 20)
    assert torch.equal(dense_mask(both, None, None, 20, 20), a & b)
    assert torch.equal(dense_mask(either, None, None, 20, 20), a | b)

    def even_heads_only(b, h, q_idx, kv_idx):
        return (h % 2 == 0) & (kv_idx <= q_idx + b)

    mask = dense_mask(and_masks(even_heads_only, causal()), 2, 4, 5, 6)
    assert mask.shape == (2, 4, 5, 6)
    expected = torch.zeros(2, 4, 5, 6, dtype=torch.bool)
    for bi in range(2):
        for hi in range(0, 4, 2):
            expected[bi, hi] = loop_mask(lambda i, j: j <= i, 5, 6)
    assert torch.equal(mask, expected)


def test_padding_mask_mod():
    key_padding = torch.tensor([[True, True, False], [False, True, True]])
    mask = dense_mask(and_masks(causal(), padding(key_padding)), 2, None, 3, 3)
    assert mask.shape == (2, 1, 3, 3)
    expected = torch.tril(torch.ones(3, 3, dtype=torch.bool)) & key_padding[:, None, None, :]
    assert torch.equal(mask, expected)


def hops_to_reach_all(adjacency, source):
    """Breadth-first search over `i -> j if adjacency[i, j]`; the depth at which every node is reached."""
    reached = torch.zeros(adjacency.shape[0], dtype=torch.bool)
    reached[source] = True
    frontier, depth = reached.clone(), 0
    while not reached.all():
        frontier = adjacency[frontier].any(dim=0) & ~reached
        assert frontier.any(), "some block is unreachable"
        reached |= frontier
        depth += 1
    return depth


def block_adjacency(mask_mod, blocks, block):
    """Token mask -> block graph; asserts the pattern is block aligned (every tile all or nothing)."""
    tokens = blocks * block
    tiles = dense_mask(mask_mod, None, None, tokens, tokens)[0, 0].view(blocks, block, blocks, block)
    any_allowed, all_allowed = tiles.any(dim=3).any(dim=1), tiles.all(dim=3).all(dim=1)
    off_diagonal = ~torch.eye(blocks, dtype=torch.bool)
    assert torch.equal(any_allowed & off_diagonal, all_allowed & off_diagonal)
    return any_allowed


def test_power_attention_reachability_oracle():
    """§10.3 item 8: 128 blocks, w = 5: every block reachable from the last within 6 layers, out-degree 10
    (vs 16 layers for a 9-block sliding window + sink block)."""
    blocks, block = 128, 2
    power_graph = block_adjacency(power(block, 5), blocks, block)
    assert int(power_graph[-1].sum()) == 10
    assert hops_to_reach_all(power_graph, blocks - 1) == 6
    window_graph = block_adjacency(sliding_window(9, 1), blocks, 1)
    assert int(window_graph[-1].sum()) == 10
    assert hops_to_reach_all(window_graph, blocks - 1) == 16


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda: sliding_window(0, 0), id="window-0"),
        pytest.param(lambda: sliding_window(4, -1), id="sinks-negative"),
        pytest.param(lambda: power(0, 5), id="block-0"),
        pytest.param(lambda: and_masks(), id="and-empty"),
        pytest.param(lambda: or_masks(), id="or-empty"),
        pytest.param(lambda: padding(torch.ones(2, 3)), id="padding-not-bool"),
        pytest.param(lambda: dense_mask(lambda b, h, q, kv: kv - q, None, None, 2, 2), id="mask-not-bool"),
    ],
)
def test_invalid_arguments(factory):
    with pytest.raises(ValueError):
        factory()
