"""The examples' data loaders on tiny files written here in the real formats."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from examples import datasets as ds
from nimplicit.errors import NimplicitError

plt = pytest.importorskip("matplotlib.pyplot")


def _save_png(path, array):
    """Write an image as PNG with matplotlib (grey when 2-D)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.ndim == 2:
        plt.imsave(path, array, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, array)


# ------------------------------------------------------------------------------ HazySky


def _sky_scene(rng, h, w, horizon):
    img = np.zeros((h, w, 3))
    img[:horizon] = [0.2, 0.4, 0.9]
    img[horizon:] = [0.15, 0.25, 0.05]          # darker: the grey levels differ too
    img += 0.02 * rng.standard_normal(img.shape)
    mask = np.zeros((h, w))
    mask[:horizon] = 1.0
    return np.clip(img, 0, 1), mask


def test_sky_folder_reads_images_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    horizons = [10, 20, 30]
    for k, hz in enumerate(horizons):
        img, mask = _sky_scene(rng, 40, 48, hz)
        _save_png(str(tmp_path / "images" / f"scene{k}.png"), img)
        _save_png(str(tmp_path / "masks" / f"scene{k}_mask.png"), mask)
    images, masks = ds.load_sky_folder(str(tmp_path), size=8)
    assert images.shape == (3, 8, 8, 3) and masks.shape == (3, 8, 8)
    assert masks.dtype == bool
    for k, hz in enumerate(horizons):
        # the sky fraction survives the resize (within one row of 8)
        assert abs(masks[k].mean() - hz / 40) <= 1 / 8 + 1e-12
        sky_blue = images[k][masks[k]][:, 2].mean()
        ground_blue = images[k][~masks[k]][:, 2].mean()
        assert sky_blue > 0.7 and ground_blue < 0.3


def test_sky_folder_errors(tmp_path):
    with pytest.raises(ds.MissingDataError, match="images/"):
        ds.load_sky_folder(str(tmp_path))
    rng = np.random.default_rng(1)
    img, mask = _sky_scene(rng, 10, 10, 4)
    _save_png(str(tmp_path / "images" / "a.png"), img)
    _save_png(str(tmp_path / "images" / "b.png"), img)
    _save_png(str(tmp_path / "masks" / "a.png"), mask)
    with pytest.raises(ds.DatasetError, match="no mask") as info:
        ds.load_sky_folder(str(tmp_path))
    assert isinstance(info.value, NimplicitError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------ binvox


def _write_binvox(path, voxels_xyz, translate=(0.0, 0.0, 0.0), scale=1.0):
    """The binvox format: text header, then (value, count) byte runs in x-z-y order."""
    dims = voxels_xyz.shape
    flat = voxels_xyz.transpose(0, 2, 1).ravel().astype(np.uint8)
    runs = bytearray()
    k = 0
    while k < len(flat):
        value, count = flat[k], 1
        while k + count < len(flat) and flat[k + count] == value and count < 255:
            count += 1
        runs += bytes([value, count])
        k += count
    header = (f"#binvox 1\ndim {dims[0]} {dims[1]} {dims[2]}\n"
              f"translate {translate[0]} {translate[1]} {translate[2]}\nscale {scale}\ndata\n")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.encode("ascii") + bytes(runs))


def test_binvox_round_trip_keeps_axes(tmp_path):
    rng = np.random.default_rng(2)
    vox = rng.random((6, 7, 5)) < 0.3          # anisotropic: an axis mix-up changes the shape
    vox[0, 1, 2] = True
    path = str(tmp_path / "m.binvox")
    _write_binvox(path, vox, translate=(0.5, -1.0, 2.0), scale=3.0)
    out = ds.read_binvox(path)
    assert out["voxels"].shape == (6, 7, 5)
    np.testing.assert_array_equal(out["voxels"], vox)
    np.testing.assert_allclose(out["translate"], [0.5, -1.0, 2.0])
    assert out["scale"] == 3.0


def test_binvox_long_runs_and_bad_files(tmp_path):
    vox = np.zeros((8, 8, 8), bool)              # 512 equal voxels: runs longer than 255
    vox[2:6, 2:6, 2:6] = True
    path = str(tmp_path / "m.binvox")
    _write_binvox(path, vox)
    np.testing.assert_array_equal(ds.read_binvox(path)["voxels"], vox)
    bad = tmp_path / "bad.binvox"
    bad.write_bytes(b"#binvox 1\ndim 2 2 2\ndata\n" + bytes([1, 3]))
    with pytest.raises(ds.DatasetError, match="runs cover 3 voxels"):
        ds.read_binvox(str(bad))
    notbinvox = tmp_path / "x.binvox"
    notbinvox.write_bytes(b"solid foo\n")
    with pytest.raises(ds.DatasetError, match="not a binvox"):
        ds.read_binvox(str(notbinvox))


def test_shapenet_layout_with_renders_and_level_set_data(tmp_path):
    g = 32
    x = np.linspace(-1, 1, g)
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    shapes = {"car": (X / 0.8) ** 2 + (Y / 0.4) ** 2 + (Z / 0.3) ** 2 < 1,
              "bottle": X ** 2 + Y ** 2 < 0.2 ** 2}
    shapes["bottle"] = shapes["bottle"] & (np.abs(Z) < 0.7)
    for cat, vox in shapes.items():
        syn = ds.SHAPENET_SYNSETS[cat]
        _write_binvox(str(tmp_path / "ShapeNetVox32" / syn / "model0" / "model.binvox"), vox)
        _save_png(str(tmp_path / "ShapeNetRendering" / syn / "model0" / "rendering" / "00.png"),
                  np.full((20, 20, 3), 0.5 if cat == "car" else 0.9))
    items = ds.load_shapenet_voxels(str(tmp_path / "ShapeNetVox32"), ["car", "bottle"],
                                    render_root=str(tmp_path / "ShapeNetRendering"))
    assert [i["category"] for i in items] == ["car", "bottle"]
    np.testing.assert_array_equal(items[0]["voxels"], shapes["car"])
    assert items[0]["view"].shape == (20, 20, 3)
    data, cats = ds.shapenet_level_set_data(str(tmp_path), np.random.default_rng(0), 5, g, 0.4)
    assert cats == ("car", "bottle")
    assert data["sdf"].shape == (2, g, g, g) and data["features"].shape == (2, 256)
    # the signed distance is negative exactly inside the voxels
    np.testing.assert_array_equal(data["sdf"][0] < 0, shapes["car"])
    # surface samples lie on the car's ellipsoid (within a voxel)
    p = data["train_points"][0]
    r = np.sqrt((p[:, 0] / 0.8) ** 2 + (p[:, 1] / 0.4) ** 2 + (p[:, 2] / 0.3) ** 2)
    assert np.abs(r - 1).max() < 0.4
    with pytest.raises(ds.MissingDataError, match="synset"):
        ds.shapenet_level_set_data(str(tmp_path / "ShapeNetRendering" / "nothing"),
                                   np.random.default_rng(0), 1, g, 0.4)


# ------------------------------------------------------------------------------ CUB


def _write_cub(root, rng, n_images=4, n_parts=15, size=(30, 40)):
    os.makedirs(root / "parts", exist_ok=True)
    lines_img, lines_cls, lines_parts, truth = [], [], [], {}
    for i in range(1, n_images + 1):
        cls = 1 + (i - 1) // 2                         # two images per class
        rel = f"{cls:03d}.Bird/img_{i}.png"
        _save_png(str(root / "images" / rel), rng.random(size + (3,)))
        lines_img.append(f"{i} {rel}")
        lines_cls.append(f"{i} {cls}")
        parts = np.column_stack([rng.uniform(0, size[1] - 1, n_parts),
                                 rng.uniform(0, size[0] - 1, n_parts)]).round(1)
        visible = rng.random(n_parts) < 0.8
        for p in range(n_parts):
            x, y = parts[p] if visible[p] else (0.0, 0.0)
            lines_parts.append(f"{i} {p + 1} {x} {y} {int(visible[p])}")
        truth[i] = (cls, parts, visible)
    (root / "images.txt").write_text("\n".join(lines_img) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_cls) + "\n")
    (root / "parts" / "part_locs.txt").write_text("\n".join(lines_parts) + "\n")
    return truth


def test_cub_annotations_and_pairs(tmp_path):
    rng = np.random.default_rng(3)
    truth = _write_cub(tmp_path, rng)
    data = ds.load_cub(str(tmp_path))
    assert sorted(data) == [1, 2, 3, 4]
    for i, (cls, parts, visible) in truth.items():
        assert data[i]["class_id"] == cls
        np.testing.assert_array_equal(data[i]["visible"], visible)
        np.testing.assert_allclose(data[i]["parts"][visible], parts[visible])
    pairs = ds.cub_pairs(data, np.random.default_rng(0), 3, min_common=4, patch=2)
    for inst in pairs:
        a, b = inst["images"]
        assert data[a]["class_id"] == data[b]["class_id"] and a != b
        # X_true maps each common part of image a to the same part of image b
        matched = inst["points2"][inst["X_true"].argmax(axis=1)]
        common = np.flatnonzero(data[a]["visible"] & data[b]["visible"])
        np.testing.assert_allclose(inst["points1"], data[a]["parts"][common])
        np.testing.assert_allclose(matched, data[b]["parts"][common])
        assert inst["F1"].shape == (len(common), 25)
        np.testing.assert_allclose(np.linalg.norm(inst["F1"], axis=1), 1.0, atol=1e-6)


def test_cub_errors(tmp_path):
    with pytest.raises(ds.MissingDataError, match="images.txt"):
        ds.load_cub(str(tmp_path))
    _write_cub(tmp_path, np.random.default_rng(4), n_images=2)
    with open(tmp_path / "parts" / "part_locs.txt", "a") as f:
        f.write("9 1 1.0 1.0 1\n")
    with pytest.raises(ds.DatasetError, match="image 9"):
        ds.load_cub(str(tmp_path))


# ------------------------------------------------------------------------------ MNIST IDX


def _write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                        for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_plain_and_gz(tmp_path):
    rng = np.random.default_rng(5)
    tr, te = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    _write_idx(str(tmp_path / "train-images-idx3-ubyte"), tr)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.arange(5), compress=True)
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), te, compress=True)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.array([7, 8, 9]))
    Xtr, ytr, Xte, yte = ds.load_mnist(str(tmp_path))
    np.testing.assert_allclose(Xtr, tr.reshape(5, 784) / 255.0)
    np.testing.assert_array_equal(ytr, np.arange(5))
    np.testing.assert_allclose(Xte, te.reshape(3, 784) / 255.0)
    np.testing.assert_array_equal(yte, [7, 8, 9])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1]))
    with pytest.raises(ds.DatasetError, match="header says"):
        ds.load_mnist(str(tmp_path))
    with pytest.raises(ds.MissingDataError, match="train-images"):
        ds.load_mnist(str(tmp_path / "nowhere"))
