"""The grid_sample deformable attention against a naive per-head, per-point bilinear loop."""
import pytest
import torch

from vfmtok.tokenizer.deformable_attention import (MultiScaleDeformableAttention, grid_reference_points,
                                            multi_scale_deformable_attention)


def bilinear_zero_padded(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """feature (H, W, D); (x, y) in [0, 1] with 0 at the left/top edge; pixel centres at (i + 0.5) / size."""
    height, width, dim = feature.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(dim, dtype=feature.dtype)
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                out += weight * feature[yi, xi]
    return out


def naive_deformable_attention(value, shapes, locations, weights):
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads * dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(dim, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    feature = value[b, starts[lvl]:starts[lvl + 1], m].reshape(h, w, dim)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc += weights[b, q, m, lvl, p] * bilinear_zero_padded(feature, x, y)
                out[b, q, m * dim:(m + 1) * dim] = acc
    return out


def random_inputs(shapes, batch=2, queries=5, heads=2, dim=3, points=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=g)
    # Locations partly outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    return value, locations, weights


@pytest.mark.parametrize("shapes,points,heads", [
    ([(4, 4), (4, 4), (4, 4), (4, 4)], 4, 2),   # equal sizes: the single-call fast path
    ([(6, 5), (3, 3), (2, 4)], 2, 3),           # different sizes: the per-level path
    ([(7, 3)], 3, 1),
])
def test_matches_naive_loop(shapes, points, heads):
    value, locations, weights = random_inputs(shapes, points=points, heads=heads)
    expected = naive_deformable_attention(value, shapes, locations, weights)
    actual = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_fast_path_equals_per_level_path():
    shapes = [(5, 5)] * 3
    value, locations, weights = random_inputs(shapes, points=3, heads=4, dim=8)
    fast = multi_scale_deformable_attention(value, shapes, locations, weights)
    # Same sizes, but force the per-level path by computing each level on its own and summing.
    per_level = sum(
        multi_scale_deformable_attention(value[:, i * 25:(i + 1) * 25], [shapes[i]], locations[:, :, :, i:i + 1],
                                         weights[:, :, :, i:i + 1])
        for i in range(3))
    torch.testing.assert_close(fast, per_level, atol=1e-5, rtol=1e-5)


def test_gradients_match_finite_differences():
    shapes = [(3, 3), (3, 3)]
    value, locations, weights = random_inputs(shapes, batch=1, queries=2, heads=1, dim=2, points=2)
    inputs = tuple(t.double().requires_grad_() for t in (value, locations.clamp(0.05, 0.95), weights))
    assert torch.autograd.gradcheck(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w), inputs)


def test_module_offsets_are_in_cells_of_each_level():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(dim=8, num_levels=2, num_heads=2, num_points=3)
    with torch.no_grad():  # non-trivial offsets and weights
        for p in module.parameters():
            p.normal_(0, 0.3)
    shapes = [(4, 6), (3, 2)]
    query = torch.randn(2, 5, 8)
    features = torch.randn(2, 4 * 6 + 3 * 2, 8)
    reference = torch.rand(2, 5, 2, 2)
    out = module(query, reference, features, shapes)

    value = module.value_proj(features).view(2, -1, 2, 4)
    offsets = module.sampling_offsets(query).view(2, 5, 2, 2, 3, 2)
    weights = module.attention_weights(query).view(2, 5, 2, 6).softmax(-1).view(2, 5, 2, 2, 3)
    locations = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(shapes):
        locations[:, :, :, lvl, :, 0] = reference[:, :, None, lvl, None, 0] + offsets[:, :, :, lvl, :, 0] / w
        locations[:, :, :, lvl, :, 1] = reference[:, :, None, lvl, None, 1] + offsets[:, :, :, lvl, :, 1] / h
    expected = module.output_proj(naive_deformable_attention(value, shapes, locations, weights))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_init_points_lie_on_rays_at_increasing_distance():
    module = MultiScaleDeformableAttention(dim=16, num_levels=2, num_heads=4, num_points=3)
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 points along +x: offsets (1, 0), (2, 0), (3, 0) cells at every level.
    torch.testing.assert_close(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), atol=1e-6, rtol=0)
    assert torch.all(module.attention_weights.weight == 0)


def test_reference_points_are_cell_centres_row_major():
    ref = grid_reference_points(2, 3)
    expected = torch.tensor([[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]])
    torch.testing.assert_close(ref, expected)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(dim=10, num_heads=3)
    module = MultiScaleDeformableAttention(dim=8, num_levels=2, num_heads=2, num_points=1)
    with pytest.raises(ValueError, match="positions"):
        module(torch.randn(1, 3, 8), torch.rand(1, 3, 2, 2), torch.randn(1, 10, 8), [(2, 2), (2, 2)])
    with pytest.raises(ValueError, match="feature levels"):
        module(torch.randn(1, 3, 8), torch.rand(1, 3, 2, 2), torch.randn(1, 4, 8), [(2, 2)])
