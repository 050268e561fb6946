"""sdjax.display: grid layout and placement, latents preview, loss plot."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from sdjax import display

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]


def solid(color, size=(10, 8)):  # size: (width, height)
    return Image.new("RGB", size, color)


def cell_color(grid, row, col, w, h, pad=0):
    """The colour at the centre of cell (row, col) of a grid of w x h cells."""
    return grid.getpixel((pad + col * (w + pad) + w // 2, pad + row * (h + pad) + h // 2))


def test_grid_default_layout_is_square_ish_and_row_major():
    grid = display.image_grid([solid(c) for c in COLORS[:5]])  # 5 images -> 3 columns, 2 rows
    assert grid.size == (3 * 10, 2 * 8)
    for i, c in enumerate(COLORS[:5]):
        assert cell_color(grid, *divmod(i, 3), 10, 8) == c
    assert cell_color(grid, 1, 2, 10, 8) == (0, 0, 0)  # the empty last cell is background


@pytest.mark.parametrize("rows,cols,shape", [(1, None, (1, 7)), (None, 2, (4, 2)), (3, 3, (3, 3)), (7, 1, (7, 1))])
def test_grid_rows_cols(rows, cols, shape):
    grid = display.image_grid([solid(c) for c in COLORS], rows=rows, cols=cols)
    assert grid.size == (shape[1] * 10, shape[0] * 8)
    for i, c in enumerate(COLORS):
        assert cell_color(grid, *divmod(i, shape[1]), 10, 8) == c


def test_grid_too_small_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="2x2 grid holds 4"):
        display.image_grid([solid(c) for c in COLORS], rows=2, cols=2)
    with pytest.raises(ValueError, match="rows"):
        display.image_grid([solid(COLORS[0])], rows=0)
    with pytest.raises(ValueError, match="at least one"):
        display.image_grid([])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        display.image_grid(np.zeros((2, 4, 4, 2)))


def test_grid_padding_and_background():
    grid = display.image_grid([solid(c) for c in COLORS[:2]], cols=2, pad=3, background=(9, 9, 9))
    assert grid.size == (2 * 10 + 3 * 3, 8 + 2 * 3)
    assert grid.getpixel((0, 0)) == (9, 9, 9)
    assert grid.getpixel((3 + 10 + 1, 3 + 4)) == (9, 9, 9)  # between the two cells
    assert cell_color(grid, 0, 0, 10, 8, pad=3) == COLORS[0]
    assert cell_color(grid, 0, 1, 10, 8, pad=3) == COLORS[1]


def test_grid_from_arrays_matches_pil_rounding():
    rng = np.random.default_rng(0)
    pixels = rng.random((3, 8, 10, 3), dtype=np.float32)  # [B, H, W, 3] in [0, 1], as Generation.pixels
    grid = np.asarray(display.image_grid(pixels, cols=3))
    expected = (pixels * 255).round().astype(np.uint8)
    for b in range(3):
        np.testing.assert_array_equal(grid[:, b * 10:(b + 1) * 10], expected[b])
    # uint8 arrays pass through unchanged; a list of [H, W, 3] arrays works too
    np.testing.assert_array_equal(np.asarray(display.image_grid(list(expected), cols=3)), grid)


def test_grid_mixed_sizes_and_grayscale():
    grid = display.image_grid([solid(COLORS[0], (4, 4)), np.full((6, 8), 1.0, np.float32)], cols=2)
    assert grid.size == (2 * 8, 6)  # cells of the largest image
    assert grid.getpixel((1, 1)) == COLORS[0]
    assert grid.getpixel((6, 5)) == (0, 0, 0)  # below the small image: background
    assert grid.getpixel((8 + 7, 5)) == (255, 255, 255)  # the grayscale image, as RGB


def test_latents_preview_shape_range_and_known_value():
    z = np.zeros((2, 3, 5, 4), np.float32)
    z[0, ..., 0] = 1.0
    out = display.latents_preview(z)
    assert out.shape == (2, 3, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], display.SD15_LATENT_RGB[0] / 2 + 0.5, rtol=1e-6)
    np.testing.assert_allclose(out[1], 0.5)  # zero latents: mid grey
    assert display.latents_preview(z[0]).shape == (3, 5, 3)  # one image, unbatched
    big = display.latents_preview(np.full((1, 2, 2, 4), 50.0, np.float32))
    assert big.min() >= 0.0 and big.max() <= 1.0


def test_latents_preview_follows_its_input():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 1, 4, 4, 4)).astype(np.float32)
    pa, pb = display.latents_preview(a), display.latents_preview(b)
    assert not np.allclose(pa, pb)
    assert pa.std() > 0.01  # varies over the image
    # linear before clipping: the preview of a + b (when nothing clips) is pa + pb - 0.5
    small_a, small_b = 0.1 * a, 0.1 * b
    np.testing.assert_allclose(display.latents_preview(small_a + small_b),
                               display.latents_preview(small_a) + display.latents_preview(small_b) - 0.5, atol=1e-6)


def test_latents_preview_rejects_wrong_channels():
    with pytest.raises(ValueError, match="latents must be"):
        display.latents_preview(np.zeros((1, 4, 4, 3)))


def test_loss_plot_from_losses_and_metrics_file(tmp_path):
    pytest.importorskip("matplotlib")
    losses = [1.0 / (i + 1) for i in range(40)]
    fig = display.loss_plot(losses)
    ax = fig.axes[0]
    raw, avg = ax.lines  # the raw curve and its moving average (width 40 // 10 = 4)
    np.testing.assert_allclose(raw.get_ydata(), losses)
    np.testing.assert_allclose(raw.get_xdata(), np.arange(1, 41))
    np.testing.assert_allclose(avg.get_ydata(), np.convolve(losses, np.ones(4) / 4, mode="valid"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert Image.open(io.BytesIO(buf.getvalue())).size[0] > 100

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 2.0 * s, "lr": 1e-4}) + "\n" for s in range(5, 9)))
    ax2 = display.loss_plot(path, smooth=1).axes[0]
    assert len(ax2.lines) == 1  # smooth=1: no average
    np.testing.assert_allclose(ax2.lines[0].get_xdata(), [5, 6, 7, 8])
    np.testing.assert_allclose(ax2.lines[0].get_ydata(), [10, 12, 14, 16])
    assert display.loss_plot(str(path), key="lr").axes[0].get_ylabel() == "lr"
