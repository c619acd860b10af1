"""Tests for qmm_plugin.paper.viz (grids, PNG output) and qmm_plugin.io (atomic writes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qmm_plugin.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from qmm_plugin.paper.viz import make_grid, save_grid, save_image, save_manifold_grid


def _load_png(path: Path) -> tuple[str, tuple[int, int], list[int]]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.mode, im.size, list(im.tobytes())  # flat, channels interleaved


# ----------------------------------------------------------------------------- make_grid


@pytest.mark.parametrize("n, nrow, c", [(10, 4, 1), (6, 3, 3), (1, 5, 1), (8, 8, 3)])
def test_make_grid_geometry(n: int, nrow: int, c: int) -> None:
    h, w, p = 5, 7, 2
    g = make_grid(torch.zeros(n, c, h, w), nrow=nrow, padding=p)
    rows = -(-n // nrow)
    cols = min(n, nrow)
    assert g.dtype == torch.uint8
    assert g.shape == (rows * (h + p) + p, cols * (w + p) + p, c)


def test_make_grid_places_images_and_values() -> None:
    # image i filled with a distinct value in [-1, 1]
    vals = torch.tensor([-1.0, 0.0, 1.0, 0.5, -0.5])
    x = vals.view(5, 1, 1, 1).expand(5, 1, 3, 4).clone()
    g = make_grid(x, nrow=2, padding=1, pad_value=7)
    assert g.shape == (3 * 4 + 1, 2 * 5 + 1, 1)
    expect = [0, 128, 255, 191, 64]  # round((v + 1) * 127.5)
    for i, e in enumerate(expect):
        r, c = divmod(i, 2)
        y0, x0 = 1 + r * 4, 1 + c * 5
        cell = g[y0 : y0 + 3, x0 : x0 + 4, 0]
        assert bool((cell == e).all()), (i, cell)
    # padding rows/cols and the unused last cell keep pad_value
    assert bool((g[0] == 7).all()) and bool((g[:, 0] == 7).all())
    assert bool((g[9:12, 6:10] == 7).all())


def test_make_grid_rgb_channel_order_and_uint8_input() -> None:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[0, 0] = 10
    x[0, 1] = 20
    x[0, 2] = 30
    g = make_grid(x, nrow=1, padding=0)
    assert g.shape == (2, 2, 3) and g[1, 1].tolist() == [10, 20, 30]


def test_make_grid_value_range_clamp_and_auto() -> None:
    x = torch.tensor([-3.0, 0.25, 3.0]).view(3, 1, 1, 1)
    assert make_grid(x, 3, 0, (0.0, 1.0)).flatten().tolist() == [0, 64, 255]
    auto = make_grid(torch.tensor([2.0, 4.0, 6.0]).view(3, 1, 1, 1), 3, 0, None).flatten().tolist()
    assert auto == [0, 128, 255]


def test_make_grid_scale() -> None:
    x = torch.tensor([[[[-1.0, 1.0]]]])  # 1x2 image: black, white
    g = make_grid(x, nrow=1, padding=1, scale=3)
    assert g.shape == (3 + 2, 6 + 2, 1)
    assert bool((g[1:4, 1:4] == 0).all()) and bool((g[1:4, 4:7] == 255).all())


def test_make_grid_errors() -> None:
    with pytest.raises(ValueError, match="channels"):
        make_grid(torch.zeros(2, 2, 4, 4), nrow=2)
    with pytest.raises(ValueError):
        make_grid(torch.zeros(2, 1, 4, 4), nrow=0)
    with pytest.raises(ValueError, match="empty"):
        make_grid(torch.zeros(0, 1, 4, 4), nrow=2)
    with pytest.raises(ValueError, match="hi > lo"):
        make_grid(torch.zeros(1, 1, 4, 4), nrow=1, value_range=(1.0, 1.0))


# ----------------------------------------------------------------------------- PNG files


def test_save_grid_png(tmp_path: Path) -> None:
    x = torch.linspace(-1, 1, 6 * 3 * 4 * 5).reshape(6, 3, 4, 5)
    p = save_grid(x, tmp_path / "sub" / "g.png", nrow=3, padding=2, scale=2)
    assert p == tmp_path / "sub" / "g.png"
    mode, size, data = _load_png(p)
    expect = make_grid(x, 3, 2, scale=2)
    assert mode == "RGB" and size == (expect.shape[1], expect.shape[0])  # (W, H)
    assert data == expect.flatten().tolist()
    assert sorted(os.listdir(tmp_path / "sub")) == ["g.png"]


def test_save_grid_grey_png(tmp_path: Path) -> None:
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    p = save_grid(x, tmp_path / "g.png", nrow=5)
    mode, size, data = _load_png(p)
    assert mode == "L" and size == (5 * 30 + 2, 30 + 2)
    assert data == make_grid(x, 5).flatten().tolist()


def test_save_manifold_grid_layout(tmp_path: Path) -> None:
    a, n, h, w = 3, 4, 2, 2
    # value encodes the manifold (row) index
    x = torch.arange(a).float().div(a - 1).mul(2).sub(1).view(a, 1, 1, 1, 1).expand(a, n, 1, h, w)
    p = save_manifold_grid(x, tmp_path / "m.png", padding=1)
    mode, (W, H), data = _load_png(p)
    assert (H, W) == (a * (h + 1) + 1, n * (w + 1) + 1)
    img = torch.tensor(data, dtype=torch.uint8).view(H, W)
    for r, level in enumerate([0, 128, 255]):
        row = img[1 + r * (h + 1) : 1 + r * (h + 1) + h]
        cells = torch.cat([row[:, 1 + j * (w + 1) : 1 + j * (w + 1) + w] for j in range(n)], 1)
        assert bool((cells == level).all()), r
    with pytest.raises(ValueError, match="A, n, C, H, W"):
        save_manifold_grid(torch.zeros(3, 1, 4, 4), tmp_path / "bad.png")


def test_save_image_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_image(torch.zeros(4, 4, 2, dtype=torch.uint8), tmp_path / "x.png")
    with pytest.raises(ValueError):
        save_image(torch.zeros(4, 4), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- atomic io


def test_atomic_torch_save_round_trip_no_temp(tmp_path: Path) -> None:
    obj = {"w": torch.arange(5), "step": 12}
    p = atomic_torch_save(obj, tmp_path / "ckpt.pt")
    atomic_torch_save({"step": 13}, tmp_path / "ckpt.pt")  # overwrite
    assert torch.load(p)["step"] == 13
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    atomic_write_text("héllo\n", tmp_path / "a" / "t.txt")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(b"\x00\x01", tmp_path / "a" / "b.bin")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin", "t.txt"]


def test_atomic_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    atomic_write_text("old", target)

    class Boom:
        def __reduce__(self):  # makes torch.save fail mid-write
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"x": torch.zeros(1000), "bad": Boom()}, target)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_manifold_grid_row_labels_add_a_text_margin(tmp_path) -> None:
    from PIL import Image

    from qmm_plugin.paper.viz import save_manifold_grid

    x = -torch.ones(3, 2, 1, 28, 28)  # black digits: any white pixel comes from the labels
    plain = Image.open(save_manifold_grid(x, tmp_path / "plain.png"))
    labelled = Image.open(save_manifold_grid(x, tmp_path / "lab.png", row_labels=["0: 7", "1: 3", "2: 9"]))
    assert labelled.size[1] == plain.size[1] and labelled.size[0] > plain.size[0]
    margin = torch.tensor(list(labelled.crop((0, 0, labelled.size[0] - plain.size[0], labelled.size[1])).getdata()))
    assert int(margin.max()) > 200  # text drawn (antialiased) on the black margin
    with pytest.raises(ValueError, match="one label per manifold"):
        save_manifold_grid(x, tmp_path / "bad.png", row_labels=["a"])


# ------------------------------------------------------------------------------ save_line_plot


def test_line_plot_draws_each_series_where_its_values_are(tmp_path: Path) -> None:
    from PIL import Image

    from qmm_plugin.paper.viz import PALETTE, save_line_plot

    series = {"flat": [(0.0, 0.5), (10.0, 0.5)], "rise": [(0.0, 0.0), (10.0, 1.0)], "dot": [(5.0, 0.25)]}
    path = save_line_plot(series, tmp_path / "p.png", "steps", "NMI", hlines=[0.75])
    with Image.open(path) as im:
        img = im.convert("RGB")
    assert img.size == (990, 420)
    # plot area: x 50..750 for 0..10, y 390..10 for 0..1
    assert img.getpixel((200, 200)) == PALETTE[0]          # "flat" at y = 0.5
    assert img.getpixel((600, 320)) == (255, 255, 255)     # nothing below the lines on the right
    assert img.getpixel((400, 105)) == (120, 120, 120)     # the threshold line at 0.75
    assert img.getpixel((50 + 350, 390 - 95)) == PALETTE[2]  # the one-point series: a dot at (5, 0.25)
    x_mid = 50 + 700 * 0.25                                  # "rise" passes (2.5, 0.25)
    assert img.getpixel((round(x_mid), 295)) == PALETTE[1]
    with pytest.raises(ValueError, match="at least one"):
        save_line_plot({"empty": []}, tmp_path / "e.png", "x", "y")
    with pytest.raises(ValueError, match="hi > lo"):
        save_line_plot(series, tmp_path / "e.png", "x", "y", y_range=(1.0, 1.0))
