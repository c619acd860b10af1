"""Tests for qmm_plugin.paper.data (idx reader, MNIST incl. embedded subset, EMNIST, letters, folders)."""

from __future__ import annotations

import gzip
import string
from pathlib import Path

import pytest
import torch

from qmm_plugin.paper.data import (
    EMBEDDED_MNIST_TEST_COUNT,
    EMBEDDED_MNIST_TRAIN_COUNT,
    write_idx,
    load_emnist,
    load_image_folder,
    load_mnist,
    read_idx,
    render_letters,
    to_model_range,
    to_uint8,
)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared/datasets/mnist"


# ----------------------------------------------------------------------------- idx


def _raw_idx(header_code: int, dims: list[int], payload: bytes) -> bytes:
    return bytes([0, 0, header_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def test_read_idx_handwritten_uint8(tmp_path: Path) -> None:
    p = tmp_path / "a-idx2-ubyte"
    p.write_bytes(_raw_idx(0x08, [2, 3], bytes([1, 2, 3, 4, 5, 250])))
    t = read_idx(p)
    assert t.dtype == torch.uint8
    assert t.tolist() == [[1, 2, 3], [4, 5, 250]]


def test_read_idx_big_endian_int32_and_float32(tmp_path: Path) -> None:
    p = tmp_path / "i32"
    p.write_bytes(_raw_idx(0x0C, [2], (1).to_bytes(4, "big") + (-2).to_bytes(4, "big", signed=True)))
    t = read_idx(p)
    assert t.dtype == torch.int32 and t.tolist() == [1, -2]
    import struct

    q = tmp_path / "f32"
    q.write_bytes(_raw_idx(0x0D, [3], struct.pack(">3f", 1.5, -2.0, 3.25)))
    assert read_idx(q).tolist() == [1.5, -2.0, 3.25]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["x-ubyte", "x-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, dtype: torch.dtype, name: str) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4, 5, 3, generator=g) * 100).to(dtype)
    p = tmp_path / name
    write_idx(t, p)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(p)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_read_idx_gz_detected_by_content_not_name(tmp_path: Path) -> None:
    p = tmp_path / "no-suffix"
    p.write_bytes(gzip.compress(_raw_idx(0x08, [3], bytes([9, 8, 7]))))
    assert read_idx(p).tolist() == [9, 8, 7]


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "magic"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x05", "type code"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated idx header"),
        (_raw_idx(0x08, [2, 2], bytes(3)), "truncated"),
        (_raw_idx(0x08, [2], bytes(5)), "trailing"),
        (b"\x00\x00", "at least 4"),
    ],
)
def test_read_idx_bad_header(tmp_path: Path, data: bytes, fragment: str) -> None:
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=fragment):
        read_idx(p)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    p = tmp_path / "bad.gz"
    p.write_bytes(gzip.compress(_raw_idx(0x08, [100], bytes(100)))[:20])
    with pytest.raises(ValueError, match="re-download"):
        read_idx(p)


def test_read_idx_corrupt_gzip_body_names_the_file(tmp_path: Path) -> None:
    """A complete gzip stream whose deflate body is damaged (zlib.error, not a truncation)."""
    p = tmp_path / "body.gz"
    data = bytearray(gzip.compress(_raw_idx(0x08, [400], bytes(range(200)) * 2)))
    for i in range(12, len(data) - 8):  # scramble the deflate body, keep header and trailer
        data[i] ^= 0xA5
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{p}.*could not be decompressed"):
        read_idx(p)


def test_read_idx_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------- MNIST


def test_embedded_mnist_train() -> None:
    x, y = load_mnist()
    assert x.shape == (EMBEDDED_MNIST_TRAIN_COUNT, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (EMBEDDED_MNIST_TRAIN_COUNT,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=10)
    assert counts.numel() == 10 and int(y.min()) == 0 and int(y.max()) == 9
    # each class 7%..13% of the first 10k MNIST digits
    assert bool((counts > 700).all()) and bool((counts < 1300).all()), counts
    # the well-known first training labels
    assert y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    # white digits on black: border dark, some full-intensity pixels
    assert int(x[:, 0, :].max()) == 0 and int(x.max()) == 255
    assert 20 < x.float().mean() < 50


def test_embedded_mnist_test() -> None:
    x, y = load_mnist(None, "test")
    assert x.shape == (EMBEDDED_MNIST_TEST_COUNT, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(y, minlength=10).min() > 100


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"{SHARED_MNIST} not present")
@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_matches_full_mnist(split: str) -> None:
    full_x, full_y = load_mnist(SHARED_MNIST, split)
    assert full_x.shape == ((60_000 if split == "train" else 10_000), 28, 28)
    x, y = load_mnist(None, split)
    n = x.shape[0]
    assert torch.equal(x, full_x[:n]) and torch.equal(y, full_y[:n])


def test_load_mnist_from_dir_plain_and_gz(tmp_path: Path) -> None:
    imgs = torch.arange(3 * 28 * 28).remainder(256).to(torch.uint8).reshape(3, 28, 28)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    write_idx(imgs, tmp_path / "t10k-images-idx3-ubyte")  # plain
    write_idx(labels, tmp_path / "t10k-labels-idx1-ubyte.gz")  # gz
    x, y = load_mnist(tmp_path, "test")
    assert torch.equal(x, imgs) and y.dtype == torch.int64 and y.tolist() == [3, 1, 4]


def test_load_mnist_missing_lists_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path, "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(ValueError, match="split"):
        load_mnist(None, "val")  # type: ignore[arg-type]


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    write_idx(torch.zeros(3, 28, 28, dtype=torch.uint8), tmp_path / "train-images-idx3-ubyte.gz")
    write_idx(torch.zeros(2, dtype=torch.uint8), tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_mnist(tmp_path)


# ----------------------------------------------------------------------------- EMNIST


def test_load_emnist_transposes(tmp_path: Path) -> None:
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 0, :] = 255  # stored: a top row -> after fixing: a left column
    (tmp_path / "gzip").mkdir()
    write_idx(img, tmp_path / "gzip" / "emnist-letters-test-images-idx3-ubyte.gz")
    write_idx(torch.tensor([26], dtype=torch.uint8), tmp_path / "gzip" / "emnist-letters-test-labels-idx1-ubyte.gz")
    x, y = load_emnist(tmp_path, "letters", train=False)
    assert x.shape == (1, 28, 28) and y.tolist() == [26] and y.dtype == torch.int64
    assert int(x[0, :, 0].min()) == 255 and int(x[0, 0, 1:].max()) == 0


def test_load_emnist_missing_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="emnist-letters-train-images-idx3-ubyte"):
        load_emnist(tmp_path)
    with pytest.raises(ValueError, match="unknown EMNIST split"):
        load_emnist(tmp_path, "greek")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ranges


def test_to_model_range_and_back_grey() -> None:
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(2, 1, 1)
    x = to_model_range(u)
    assert x.shape == (2, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(to_uint8(x), u)


def test_to_model_range_and_back_rgb() -> None:
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (3, 5, 7, 3), generator=g, dtype=torch.uint8)
    x = to_model_range(u)
    assert x.shape == (3, 3, 5, 7)
    assert float(x[1, 2, 3, 4]) == pytest.approx(u[1, 3, 4, 2].item() / 127.5 - 1)
    back = to_uint8(x)
    assert back.shape == u.shape and torch.equal(back, u)


def test_range_errors() -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError):
        to_model_range(torch.zeros(2, 4, 4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(2, 2, 4, 4))
    assert to_uint8(torch.tensor([[[[5.0, -5.0]]]])).tolist() == [[[255, 0]]]


# ----------------------------------------------------------------------------- letters


def test_render_letters_basic() -> None:
    x, y = render_letters(40, seed=3)
    assert x.shape == (40, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (40,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 26
    ink = (x > 128).flatten(1).sum(1)
    assert bool((ink >= 15).all()), ink  # every image has a visible stroke
    assert bool((ink <= 28 * 28 * 0.5).all())  # and is not a white blob
    # white on black, roughly centred like MNIST: 2-pixel border almost empty
    border = torch.ones(28, 28, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert x[:, border].float().mean() < 5


def test_render_letters_deterministic() -> None:
    a = render_letters(12, seed=7)
    b = render_letters(12, seed=7)
    c = render_letters(12, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_render_letters_different_letters_differ() -> None:
    # with one letter only, labels are all 0; 'O' and 'I' differ in ink amount systematically
    xo, yo = render_letters(10, seed=0, letters="O")
    xi, yi = render_letters(10, seed=0, letters="I")
    assert yo.tolist() == [0] * 10 and yi.tolist() == [0] * 10
    assert not torch.equal(xo, xi)
    # 'I' is a thin vertical bar: much narrower than 'O'
    width = lambda x: (x > 64).any(1).sum(1).float().mean()  # noqa: E731
    assert width(xi) < 0.6 * width(xo)


def test_render_letters_size_and_alphabet() -> None:
    x, y = render_letters(5, seed=0, letters=string.digits, size=32)
    assert x.shape == (5, 32, 32) and int(y.max()) < 10
    assert render_letters(0)[0].shape == (0, 28, 28)
    with pytest.raises(ValueError):
        render_letters(3, letters="")


# ----------------------------------------------------------------------------- image folders


def _write_pngs(root: Path) -> None:
    from PIL import Image

    (root / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "a" / "red.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "a" / "b" / "blue.JPG", quality=95)
    Image.new("L", (10, 10), 200).save(root / "grey.jpeg", quality=95)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(root / "clear.png")  # transparent -> white
    (root / "notes.txt").write_text("not an image")


def test_load_image_folder_rgb(tmp_path: Path) -> None:
    _write_pngs(tmp_path)
    x = load_image_folder(tmp_path, size=16, channels=3)
    assert x.shape == (4, 16, 16, 3) and x.dtype == torch.uint8
    # sorted order: a/b/blue.JPG, a/red.png, clear.png, grey.jpeg
    mean = x.float().mean((1, 2))
    assert mean[0, 2] > 240 and mean[0, 0] < 15  # blue
    assert mean[1, 0] > 250 and mean[1, 1] < 5  # red
    assert bool((x[2] == 255).all())  # transparent composited on white
    assert bool(((mean[3] - 200).abs() < 3).all())  # grey


def test_load_image_folder_grey_and_limit(tmp_path: Path) -> None:
    _write_pngs(tmp_path)
    x = load_image_folder(tmp_path, size=8, channels=1, max_images=2)
    assert x.shape == (2, 8, 8)
    # blue (0,0,255) -> L = 0.114*255 ~ 29; red -> 0.299*255 ~ 76
    assert abs(x[0].float().mean() - 29) < 4 and abs(x[1].float().mean() - 76) < 4


def test_load_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no .png/.jpg/.jpeg"):
        load_image_folder(tmp_path / "empty", size=8, channels=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", size=8, channels=1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image_folder(tmp_path / "broken", size=8, channels=3)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, size=8, channels=2)  # type: ignore[arg-type]


def _axis_angle_deg(img: torch.Tensor) -> float:
    """Angle of the principal axis of the ink (second moments), in degrees from horizontal."""
    w = img.float()
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    m = w.sum()
    my, mx = (w * ys).sum() / m, (w * xs).sum() / m
    cyy = (w * (ys - my) ** 2).sum() / m
    cxx = (w * (xs - mx) ** 2).sum() / m
    cxy = (w * (xs - mx) * (ys - my)).sum() / m
    import math

    return math.degrees(0.5 * math.atan2(2 * float(cxy), float(cxx - cyy)))


def test_render_letters_affine_jitter() -> None:
    # a horizontal bar: shear leaves it horizontal, so its tilt spread comes from rotation
    bars, _ = render_letters(30, seed=0, letters="-")
    angles = torch.tensor([_axis_angle_deg(b) for b in bars])
    assert angles.abs().max() < 25 and angles.std() > 4, angles
    # a vertical bar: rotation + shear tilt it
    ies, _ = render_letters(30, seed=0, letters="I")
    tilt = torch.tensor([_axis_angle_deg(i) for i in ies]).abs().sub(90).abs()
    assert tilt.std() > 4 and tilt.max() < 45, tilt
    # stroke width / scale jitter: ink amount of the same letter varies
    ink = (ies > 128).flatten(1).sum(1).float()
    assert ink.std() / ink.mean() > 0.1, ink
