"""A convolution's patch Gram by row/column correlations and by patch rows, against float64
products of the unfolded patches; the Gram of a convolution's output-gradient columns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spamkern.ops import conv_gram
from spamkern.ops.conv_gram import cheapest_route, conv_patch_gram, output_size
from spamkern.ops.factors import gram_of_columns

ROUTES = ("rows", "cols", "patches")
# (kernel, stride, padding, dilation, input height and width)
GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), (13, 11)),
    ((5, 5), (1, 1), (0, 0), (1, 1), (12, 12)),
    ((2, 3), (2, 1), (0, 2), (2, 1), (9, 14)),
    ((5, 1), (3, 2), (2, 0), (1, 3), (17, 10)),
    ((4, 2), (3, 1), (1, 0), (2, 2), (15, 9)),
    ((1, 5), (1, 1), (0, 2), (1, 1), (1, 20)),
    ((3, 3), (2, 2), (1, 1), (1, 1), (16, 16)),
    ((1, 1), (1, 1), (0, 0), (1, 1), (7, 5)),
    ((3, 3), (1, 1), (0, 0), (1, 1), (3, 3)),  # one output position
]


def unfold_gram(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    u = F.unfold(x.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    u = u.transpose(1, 2).reshape(-1, u.shape[1])
    return u.T @ u


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture
def force_route(monkeypatch):
    def force(route: str) -> None:
        monkeypatch.setattr(conv_gram, "cheapest_route", lambda *args: route)

    return force


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "hw"), GEOMETRIES)
def test_every_route_matches_the_unfolded_patches(
    force_route, route, kernel, stride, padding, dilation, hw
):
    force_route(route)
    x = torch.randn(3, 4, *hw, dtype=torch.float64)
    result = conv_gram.patch_gram(x, kernel, stride, padding, dilation)
    assert rel_err(result, unfold_gram(x, kernel, stride, padding, dilation)) <= 1e-13


@pytest.mark.parametrize("route", ROUTES)
def test_float32_accumulates_into_out_with_alpha(force_route, route):
    force_route(route)
    x = torch.randn(5, 3, 10, 9)
    geometry = ((3, 2), (1, 2), (1, 0), (2, 1))
    d = 3 * 3 * 2
    base = torch.randn(d, d, dtype=torch.float64)
    for out in (base.clone(), base.float()):
        expected = out.double() + 0.25 * unfold_gram(x, *geometry)
        result = conv_patch_gram(x, *geometry, out=out, alpha=0.25)
        assert result is out
        assert rel_err(result, expected) <= 1e-5
    fresh = conv_patch_gram(x, *geometry, alpha=0.5)
    assert fresh.dtype == torch.float32
    assert rel_err(fresh, 0.5 * unfold_gram(x, *geometry)) <= 1e-5


def test_half_inputs_are_multiplied_in_float32():
    x = torch.randn(4, 3, 8, 8).half()
    result = conv_patch_gram(x, (3, 3), padding=(1, 1))
    assert result.dtype == torch.float32
    assert rel_err(result, unfold_gram(x, (3, 3), (1, 1), (1, 1), (1, 1))) <= 1e-5


@pytest.mark.parametrize("route", ROUTES)
def test_channels_last_and_sliced_inputs(force_route, route):
    force_route(route)
    x = torch.randn(4, 6, 11, 12).to(memory_format=torch.channels_last)[:, 1:5, :, 1:]
    geometry = ((3, 3), (1, 2), (1, 1), (1, 2))
    assert rel_err(conv_patch_gram(x, *geometry), unfold_gram(x, *geometry)) <= 1e-5


def test_the_route_with_fewest_products_is_taken():
    def route(shape, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
        sizes = tuple(
            output_size(shape[2 + a], kernel[a], stride[a], padding[a], dilation[a]) for a in (0, 1)
        )
        return cheapest_route(shape, kernel, stride, dilation, sizes)

    assert route((128, 6, 12, 12), (5, 5)) == "rows"  # LeNet-5's second convolution
    assert route((128, 16, 16, 16), (3, 3), padding=(1, 1)) == "rows"
    assert route((8, 4, 1, 40), (1, 5)) == "cols"  # a Conv1d as a height-1 Conv2d
    assert route((128, 64, 16, 16), (1, 1), stride=(2, 2)) == "patches"
    assert route((128, 64, 16, 16), (3, 3), stride=(2, 2), padding=(1, 1)) == "patches"


def test_a_convolution_without_output_positions_is_an_error():
    with pytest.raises(ValueError, match="no output positions"):
        conv_patch_gram(torch.randn(1, 2, 3, 3), (5, 5))


@pytest.mark.parametrize("chunk", [None, 2 * 6 * 6])
def test_gram_of_columns_sums_every_sample(monkeypatch, chunk):
    if chunk is not None:  # two samples per batched product: several chunks
        monkeypatch.setattr("spamkern.ops.factors._CHUNK_ELEMENTS", chunk)
    g = torch.randn(7, 6, 25)
    rows = g.double().transpose(1, 2).reshape(-1, 6)
    assert rel_err(gram_of_columns(g), rows.T @ rows) <= 1e-5
    out = torch.randn(6, 6, dtype=torch.float64)
    expected = out + rows.T @ rows
    assert gram_of_columns(g, out) is out
    assert rel_err(out, expected) <= 1e-5


def test_gram_of_columns_wants_three_dimensions():
    with pytest.raises(ValueError, match=r"\(n, d, s\)"):
        gram_of_columns(torch.randn(4, 5))
