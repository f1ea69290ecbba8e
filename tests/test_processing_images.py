"""Image loading (modes, EXIF, animation, limits, errors) and per-family preprocessing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mlx_llama3v import config
from mlx_llama3v.processing import (
    ImageError,
    default_processor_config,
    expand_to_square,
    load_image,
    preprocess_image,
    resolve_processor_config,
    slice_image,
)
from mlx_llama3v.processing import preprocess as preprocess_module


def _png_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _rgb(img):
    assert img.mode == "RGB"
    return np.asarray(img)


# ---------------------------------------------------------------- sources


def test_path_str_pathlike_bytes_fileobj_pil(tmp_path):
    src = Image.new("RGB", (7, 5), (10, 200, 30))
    path = tmp_path / "a.png"
    src.save(path)
    for s in (str(path), path, path.read_bytes(), bytearray(path.read_bytes()), open(path, "rb"), src):
        out = load_image(s)
        assert out.size == (7, 5)
        assert np.all(_rgb(out) == (10, 200, 30))


def test_load_returns_independent_copy(tmp_path):
    src = Image.new("RGB", (4, 4), (1, 2, 3))
    out = load_image(src)
    out.putpixel((0, 0), (9, 9, 9))
    assert src.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((3, 4), 200, np.uint8), (200, 200, 200)),
        (np.full((3, 4, 1), 7, np.uint8), (7, 7, 7)),
        (np.tile(np.array([1, 2, 3], np.uint8), (3, 4, 1)), (1, 2, 3)),
        (np.full((3, 4, 3), 128 * 257, np.uint16), (128, 128, 128)),
        (np.full((3, 4), 65535, np.uint16), (255, 255, 255)),
        (np.full((3, 4, 3), 0.5, np.float32), (128, 128, 128)),  # round(127.5) -> 128 (even)
        (np.full((3, 4, 3), 1.0, np.float64), (255, 255, 255)),
        (np.ones((3, 4), bool), (255, 255, 255)),
    ],
)
def test_numpy_arrays(arr, expected):
    out = load_image(arr)
    assert out.size == (4, 3)
    assert np.all(_rgb(out) == expected)


def test_numpy_rgba_composited_on_white():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[0, 0, 3] = 255  # opaque
    arr[0, 1, 3] = 0  # transparent -> white
    arr[1, :, 3] = 128  # half
    out = _rgb(load_image(arr)).astype(int)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert out[1, 0, 0] == 255 and abs(out[1, 0, 1] - 127) <= 1 and abs(out[1, 0, 2] - 127) <= 1


@pytest.mark.parametrize(
    "arr, words",
    [
        (np.zeros((3, 4, 5), np.uint8), "HxW"),
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
        (np.full((2, 2), 1.5, np.float32), "[0, 1]"),
        (np.full((2, 2), np.nan, np.float32), "NaN"),
        (np.zeros((2, 2), np.int64), "dtype"),
        (np.zeros((2, 2, 2, 3), np.uint8), "HxW"),
    ],
)
def test_bad_arrays(arr, words):
    with pytest.raises(ImageError) as e:
        load_image(arr)
    assert words in str(e.value)
    assert str(e.value).startswith("<array")


# ---------------------------------------------------------------- modes


def test_mode_L_and_1():
    assert np.all(_rgb(load_image(Image.new("L", (3, 3), 77))) == 77)
    assert np.all(_rgb(load_image(Image.new("1", (3, 3), 1))) == 255)


def test_mode_LA_on_white():
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((0, 0), (0, 255))
    out = _rgb(load_image(Image.open(io.BytesIO(_png_bytes(img)))))
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_mode_RGBA_on_white_from_file(tmp_path):
    img = Image.new("RGBA", (3, 1), (0, 0, 255, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    img.putpixel((1, 0), (0, 0, 255, 64))
    path = tmp_path / "rgba.png"
    img.save(path)
    out = _rgb(load_image(path)).astype(int)
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 2]) == (255, 255, 255)  # fully transparent blue -> white, not blue
    # 64/255 blue over white: R = G = 255 * (1 - 64/255) = 191
    assert abs(out[0, 1, 0] - 191) <= 1 and out[0, 1, 2] == 255


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_mode_P_with_transparency(fmt):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)  # 0 green, 1 red
    img.putpixel((1, 0), 1)
    buf = io.BytesIO()
    img.save(buf, format=fmt, transparency=0)
    reloaded = Image.open(io.BytesIO(buf.getvalue()))
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    out = _rgb(load_image(buf.getvalue()))
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent green -> white
    assert tuple(out[0, 1]) == (255, 0, 0)


def test_mode_P_without_transparency():
    img = Image.new("P", (1, 1), 0)
    img.putpalette([12, 34, 56] + [0] * 765)
    assert tuple(_rgb(load_image(img))[0, 0]) == (12, 34, 56)


def test_mode_CMYK(tmp_path):
    img = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.all(_rgb(load_image(img)) == (255, 0, 0))
    path = tmp_path / "c.tif"
    img.save(path)
    assert np.all(_rgb(load_image(path)) == (255, 0, 0))


def test_16_bit_png(tmp_path):
    arr = np.array([[0, 257 * 128, 65535], [257, 256, 1000]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = _rgb(load_image(path))
    expected = np.round(arr / 257).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 1], expected)
    assert list(out[0, :, 0]) == [0, 128, 255] and list(out[1, :, 0]) == [1, 1, 4]


def test_mode_I_32bit_taken_as_16_bit_range():
    img = Image.fromarray(np.array([[65535, 0, 70000]], dtype=np.int32))
    assert img.mode == "I"
    assert list(_rgb(load_image(img))[0, :, 0]) == [255, 0, 255]


def test_exif_orientation_applied(tmp_path):
    # left half red, right half blue; Orientation 6: display = rotated 90 deg clockwise
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    out = _rgb(load_image(path)).astype(int)
    assert out.shape == (64, 32, 3)
    top, bottom = out[:24].mean(axis=(0, 1)), out[40:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animation_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    assert np.all(_rgb(load_image(path)) == (255, 0, 0))
    opened = Image.open(path)
    opened.seek(2)  # a PIL image handed in is taken at its current frame
    assert np.all(_rgb(load_image(opened)) == (0, 0, 255))


# ---------------------------------------------------------------- limits and errors


def _png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_limit_checked_before_decoding(tmp_path):
    # 9000 x 8000 = 72 megapixels declared, no pixel data at all: the header is enough
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(9000, 8000))
    with pytest.raises(ImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "9000x8000" in msg and "megapixels" in msg and "\n" not in msg


def test_pixel_limit_override():
    img = Image.new("RGB", (100, 60))
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_png_bytes(img), max_pixels=5000)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(img, max_pixels=5999)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(np.zeros((60, 100), np.uint8), max_pixels=5999)
    assert load_image(img, max_pixels=6000).size == (100, 60)
    assert load_image(img, max_pixels=None).size == (100, 60)


def test_zero_size_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as e:
        load_image(path)
    assert str(path) in str(e.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_corrupt_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="not a recognised image") as e:
        load_image(garbage)
    assert str(e.value).startswith(str(garbage))

    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(truncated)
    assert str(e.value).startswith(str(truncated)) and "\n" not in str(e.value)

    header_only = tmp_path / "header.png"
    header_only.write_bytes(_png_header_only(20, 10))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(header_only)


def test_missing_file_directory_url(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="URLs are not supported"):
        load_image("https://example.com/cat.png")


@pytest.mark.parametrize("bad", [42, 3.5, None, ["a.png"], {"image": 1}])
def test_unsupported_type(bad):
    with pytest.raises(ImageError, match="unsupported image source type") as e:
        load_image(bad)
    assert type(bad).__name__ in str(e.value)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------- processor_config


def test_families_match_config():
    assert set(preprocess_module._FAMILY) == set(config.FAMILIES)


def test_default_processor_configs():
    m = default_processor_config("minicpm_v2_5")
    assert (m["image_size"], m["tokens_per_tile"], m["slice"], m["max_slices"]) == (448, 96, True, 9)
    s = default_processor_config("siglip_llama3")
    assert (s["image_size"], s["tokens_per_tile"], s["slice"]) == (384, 729, False)
    assert (s["text_start"], s["text_end"]) == ("<text>", "</text>")
    b = default_processor_config("bunny")
    assert b["pad_color"] == (127, 127, 127) and b["tokens_per_tile"] == (384 // 14) ** 2
    assert b["system_prompt"].startswith("A chat between")
    with pytest.raises(ValueError, match="unknown family"):
        default_processor_config("llava")


def test_resolve_processor_config():
    cfg = resolve_processor_config({"family": "minicpm_v2_5", "scale_resolution": 336,
                                    "max_slice_nums": 4, "query_num": 64, "extra": 1})
    assert (cfg["image_size"], cfg["max_slices"], cfg["tokens_per_tile"], cfg["extra"]) == (336, 4, 64, 1)
    assert resolve_processor_config(None, family="bunny")["family"] == "bunny"
    with pytest.raises(ValueError, match="family"):
        resolve_processor_config({})
    with pytest.raises(ValueError, match="bunny"):
        resolve_processor_config({"family": "bunny", "slice": True})
    with pytest.raises(ValueError, match="positive int"):
        resolve_processor_config({"family": "bunny", "tokens_per_tile": 0})


# ---------------------------------------------------------------- preprocessing


def _noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_minicpm_preprocess_matches_slices():
    img = _noise(1344, 900)
    out = preprocess_image(img, {"family": "minicpm_v2_5"})
    tiles, grid = slice_image(img)
    assert out.grid == grid == (3, 2)
    assert len(out.tiles) == 7
    for arr, tile in zip(out.tiles, tiles):
        assert arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[2] == 3
        assert arr.shape[:2] == (tile.height, tile.width)
        assert arr.shape[0] % 14 == 0 and arr.shape[1] % 14 == 0
        expected = (np.asarray(tile, np.float32) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(arr, expected, rtol=0, atol=1e-6)
    assert out.tiles[0].min() >= -1.0 and out.tiles[0].max() <= 1.0


def test_minicpm_normalisation_exact_values():
    arr = np.array([[[0, 255, 51]]], np.uint8)
    out = preprocess_image(arr, {"family": "minicpm_v2_5"}).tiles[0]
    assert out.shape == (448, 448, 3)
    np.testing.assert_allclose(out[0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], atol=1e-6)


def test_minicpm_no_slice_mode():
    out = preprocess_image(_noise(1344, 900), {"family": "minicpm_v2_5", "slice": False})
    assert out.grid is None and len(out.tiles) == 1


def test_siglip_llama3_single_tile():
    img = _noise(640, 480)
    out = preprocess_image(img, {"family": "siglip_llama3"})
    assert out.grid is None and len(out.tiles) == 1
    assert out.tiles[0].shape == (384, 384, 3) and out.tiles[0].dtype == np.float32
    expected = np.asarray(img.resize((384, 384), Image.BICUBIC), np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(out.tiles[0], expected, atol=1e-6)


def test_siglip_llama3_tiling():
    img = _noise(1000, 500)
    out = preprocess_image(img, {"family": "siglip_llama3", "slice": True})
    # 1000*500 / 384^2 = 3.4 -> 4 wanted; candidates for 3, 4, 5: (3, 1) is closest to 2:1
    assert out.grid == (3, 1)
    assert len(out.tiles) == 4 and all(t.shape == (384, 384, 3) for t in out.tiles)
    refined = np.asarray(img.resize((1152, 384), Image.BICUBIC), np.float32) / 255 * 2 - 1
    for i in range(3):
        np.testing.assert_allclose(out.tiles[1 + i], refined[:, 384 * i:384 * (i + 1)], atol=1e-6)
    small = preprocess_image(_noise(300, 200), {"family": "siglip_llama3", "slice": True})
    assert small.grid is None and len(small.tiles) == 1


def test_bunny_pads_with_grey_then_resizes():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    out = preprocess_image(img, {"family": "bunny"})
    assert out.grid is None and len(out.tiles) == 1
    tile = out.tiles[0]
    assert tile.shape == (384, 384, 3)
    grey = 127 / 255 * 2 - 1
    np.testing.assert_allclose(tile[0, 0], [grey] * 3, atol=1e-6)
    np.testing.assert_allclose(tile[-1, -1], [grey] * 3, atol=1e-6)
    np.testing.assert_allclose(tile[192, 192], [1.0, -1.0, -1.0], atol=1e-6)
    # the band is centred: 100 rows of 300 start at row 100 -> 128..256 of 384
    assert np.allclose(tile[120, 192], grey, atol=1e-6) and np.allclose(tile[136, 192], [1, -1, -1], atol=1e-6)
    assert np.allclose(tile[264, 192], grey, atol=1e-6) and np.allclose(tile[248, 192], [1, -1, -1], atol=1e-6)


def test_expand_to_square_offsets():
    img = Image.new("RGB", (5, 2), (9, 9, 9))
    sq = np.asarray(expand_to_square(img, (127, 127, 127)))
    assert sq.shape == (5, 5, 3)
    assert [int(sq[r, 0, 0]) for r in range(5)] == [127, 9, 9, 127, 127]  # offset (5-2)//2 = 1
    tall = np.asarray(expand_to_square(Image.new("RGB", (1, 4), (9, 9, 9)), (0, 0, 0)))
    assert [int(tall[0, c, 0]) for c in range(4)] == [0, 9, 0, 0]
    assert expand_to_square(img.resize((3, 3)), (0, 0, 0)).size == (3, 3)


def test_preprocess_loads_any_source(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(path)
    tile = preprocess_image(path, {"family": "bunny"}).tiles[0]
    np.testing.assert_allclose(tile, 1.0, atol=1e-6)  # transparent -> white
    with pytest.raises(ImageError):
        preprocess_image(b"junk", {"family": "bunny"})


def test_lazily_opened_truncated_pil_image(tmp_path):
    data = _png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # header read, pixels not yet
    with pytest.raises(ImageError, match="^<PIL image>: corrupt or truncated"):
        load_image(lazy)


def test_processor_config_survives_json_round_trip():
    import json

    for family in config.FAMILIES:
        saved = json.loads(json.dumps(default_processor_config(family)))
        cfg = resolve_processor_config(saved)
        a = preprocess_image(_noise(50, 30), cfg)
        b = preprocess_image(_noise(50, 30), default_processor_config(family))
        assert all(np.array_equal(x, y) for x, y in zip(a.tiles, b.tiles))
