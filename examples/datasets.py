r"""Loaders for the paper's data sets from a local path (nothing is ever downloaded).

=====================  ===================================================  =====================
data set               layout expected under ``root``                       loader
=====================  ===================================================  =====================
HazySky-style (NCut)   ``images/<stem>.png|jpg`` and ``masks/<stem>[_mask]``  :func:`load_sky_folder`
                       ``.png`` (mask: non-zero = sky)
ShapeNet (level set)   3D-R2N2 layout: ``<vox_root>/<synset>/<model>/``      :func:`load_shapenet_voxels`
                       ``model.binvox`` (32^3) and optionally
                       ``<render_root>/<synset>/<model>/rendering/00.png``
CUB-200-2011 (GM)      ``images.txt``, ``image_class_labels.txt``,           :func:`load_cub`
                       ``parts/part_locs.txt``, ``images/<relpath>``
MNIST (QP)             ``train-images-idx3-ubyte[.gz]`` etc. (IDX)           :func:`load_mnist`
=====================  ===================================================  =====================

Graph matching uses CUB-200-2011's 15 part keypoints (not Willow-ObjectClass):
:func:`cub_pairs` builds same-class image pairs whose common visible parts are the
ground-truth matches.

Images are read with PIL when it is installed, else with matplotlib (PNG only).
Every failure is a :class:`DatasetError` (a :class:`nimplicit.errors.NimplicitError`
and a ``ValueError``; :class:`MissingDataError` is also a ``FileNotFoundError``)
whose message names the file and the layout expected.
"""
from __future__ import annotations

import gzip
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nimplicit.errors import NimplicitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# ShapeNetCore synset ids of the paper's Table 1 categories
SHAPENET_SYNSETS = {"car": "02958343", "chair": "03001627", "bottle": "02876657",
                    "sofa": "04256520"}


class DatasetError(NimplicitError, ValueError):
    """A local data set is malformed (wrong header, inconsistent files, ...)."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A file or folder the loader needs is not there."""


# ------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------

def read_image(path: str) -> np.ndarray:
    """An image as float in ``[0, 1]``: ``(H, W)`` grey or ``(H, W, 3)`` RGB (alpha dropped)."""
    if not os.path.isfile(path):
        raise MissingDataError(f"no image file {path}")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    try:
        if Image is not None:
            with Image.open(path) as im:
                arr = np.asarray(im)
                if im.mode in ("I;16", "I;16B", "I"):
                    arr = arr.astype(float) / max(float(arr.max()), 1.0)
        else:
            import matplotlib.image as mpimg
            arr = mpimg.imread(path)
    except Exception as exc:
        raise DatasetError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") from exc
    arr = np.asarray(arr)
    if arr.dtype.kind in "ui":
        arr = arr.astype(float) / np.iinfo(arr.dtype).max
    arr = arr.astype(float)
    if arr.ndim == 3:
        arr = arr[..., :3]
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    return arr


def resize(image: np.ndarray, size: Tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize ``(H, W[, C])`` to ``size = (h, w)`` by area averaging (``order=1``) or
    nearest neighbour (``order=0``, for masks); plain numpy/scipy."""
    import scipy.ndimage as ndi
    h, w = size
    H, W = image.shape[:2]
    if (H, W) == (h, w):
        return image.copy()
    if order == 0:
        rows = np.minimum((np.arange(h) + 0.5) * H / h, H - 1).astype(int)
        cols = np.minimum((np.arange(w) + 0.5) * W / w, W - 1).astype(int)
        return image[rows][:, cols]
    sigma = [max(H / h / 2.0 - 0.5, 0), max(W / w / 2.0 - 0.5, 0)] + [0] * (image.ndim - 2)
    smooth = ndi.gaussian_filter(image, sigma, mode="nearest")
    zoom = [h / H, w / W] + [1] * (image.ndim - 2)
    out = ndi.zoom(smooth, zoom, order=1, mode="nearest", grid_mode=True)
    return np.clip(out[:h, :w], 0.0, 1.0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114])


# ------------------------------------------------------------------------------
# HazySky-style sky segmentation folders (NCut)
# ------------------------------------------------------------------------------

def _find_dir(root: str, names: Sequence[str]) -> str:
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise MissingDataError(f"{root} has none of the folders {list(names)}: a HazySky-style "
                           f"folder holds images/ (the photographs) and masks/ (sky masks)")


def sky_folder_pairs(root: str) -> List[Tuple[str, str]]:
    """``(image, mask)`` path pairs of a HazySky-style folder, sorted by name.

    A mask matches an image with the same stem, optionally with ``_mask``/``_gt``/
    ``_sky`` appended; images without a mask raise :class:`DatasetError`.
    """
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise MissingDataError(f"no folder {root}")
    img_dir = _find_dir(root, ("images", "image", "img", "imgs"))
    mask_dir = _find_dir(root, ("masks", "mask", "gt", "labels"))
    masks = {}
    for name in os.listdir(mask_dir):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            for suffix in ("_mask", "_gt", "_sky"):
                if stem.endswith(suffix):
                    stem = stem[:-len(suffix)]
                    break
            masks[stem] = os.path.join(mask_dir, name)
    pairs, missing = [], []
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in masks:
            pairs.append((os.path.join(img_dir, name), masks[stem]))
        else:
            missing.append(name)
    if missing:
        raise DatasetError(f"{len(missing)} image(s) in {img_dir} have no mask in {mask_dir} "
                           f"(e.g. {missing[0]}): masks must share the image's stem")
    if not pairs:
        raise MissingDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir}")
    return pairs


def load_sky_folder(root: str, size: int = 24, limit: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, size, size, 3)`` in ``[0, 1]`` and boolean sky masks ``(N, size, size)``.

    Masks are thresholded at half their maximum after a nearest-neighbour resize.
    """
    pairs = sky_folder_pairs(root)[:limit]
    images, masks = [], []
    for img_path, mask_path in pairs:
        img = _as_rgb(read_image(img_path))
        mask = _grey(read_image(mask_path))
        if mask.shape != img.shape[:2]:
            raise DatasetError(f"mask {mask_path} is {mask.shape}, image {img_path} is "
                               f"{img.shape[:2]}: they must have the same size")
        images.append(resize(img, (size, size)))
        peak = mask.max()
        masks.append(resize(mask, (size, size), order=0) > 0.5 * peak if peak > 0 else
                     np.zeros((size, size), bool))
    return np.stack(images), np.stack(masks)


# ------------------------------------------------------------------------------
# ShapeNet binvox voxel grids (level set)
# ------------------------------------------------------------------------------

def read_binvox(path: str) -> Dict[str, np.ndarray]:
    """A ``.binvox`` file: ``voxels`` (bool, indexed ``[x, y, z]``), ``dims``,
    ``translate``, ``scale``.

    Format: text header ``#binvox 1`` / ``dim d1 d2 d3`` / ``translate tx ty tz`` /
    ``scale s`` / ``data``, then run-length pairs of bytes ``(value, count)`` over
    the voxels in binvox's order (x slowest, then z, then y fastest); the grid is
    returned transposed to ``[x, y, z]`` as binvox-rw does.
    """
    if not os.path.isfile(path):
        raise MissingDataError(f"no binvox file {path}")
    with open(path, "rb") as f:
        raw = f.read()
    header, dims, translate, scale, pos = {}, None, np.zeros(3), 1.0, 0
    for k in range(8):
        end = raw.find(b"\n", pos)
        if end < 0:
            raise DatasetError(f"{path}: header ends early (no 'data' line)")
        line = raw[pos:end].decode("ascii", "replace").strip()
        pos = end + 1
        if k == 0:
            if not line.startswith("#binvox"):
                raise DatasetError(f"{path} is not a binvox file (first line {line[:30]!r}, "
                                   f"expected '#binvox 1')")
            continue
        if line == "data":
            break
        key, *values = line.split()
        header[key] = values
    else:
        raise DatasetError(f"{path}: no 'data' line in the header")
    try:
        dims = tuple(int(v) for v in header["dim"])
        translate = np.array([float(v) for v in header.get("translate", [0, 0, 0])])
        scale = float(header.get("scale", [1.0])[0])
    except (KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: bad header {header} ({exc})") from exc
    body = np.frombuffer(raw, dtype=np.uint8, offset=pos)
    if len(body) % 2:
        raise DatasetError(f"{path}: odd number of run-length bytes ({len(body)})")
    values, counts = body[0::2], body[1::2].astype(np.int64)
    total = int(np.prod(dims))
    if counts.sum() != total:
        raise DatasetError(f"{path}: the runs cover {counts.sum()} voxels, the header's dim "
                           f"{dims} needs {total}")
    flat = np.repeat(values.astype(bool), counts)
    # stored with x slowest, then z, then y fastest; ``dim`` lists the x, y, z sizes
    voxels = flat.reshape(dims[0], dims[2], dims[1]).transpose(0, 2, 1)
    return {"voxels": np.ascontiguousarray(voxels), "dims": np.array(dims),
            "translate": translate, "scale": scale}


def load_shapenet_voxels(vox_root: str, categories: Sequence[str] = tuple(SHAPENET_SYNSETS),
                         render_root: Optional[str] = None, per_category: Optional[int] = None,
                         view: int = 0) -> List[dict]:
    """ShapeNet models in the 3D-R2N2 layout.

    Parameters
    ----------
    vox_root : folder with ``<synset>/<model>/model.binvox`` (ShapeNetVox32)
    categories : names in :data:`SHAPENET_SYNSETS` or synset ids
    render_root : optional folder with ``<synset>/<model>/rendering/NN.png``
        (ShapeNetRendering); the view ``view`` is loaded when present
    per_category : at most this many models per category (sorted by model id)

    Returns
    -------
    list of dicts with ``category``, ``model``, ``voxels`` (bool ``[x, y, z]``) and
    ``view`` (the rendered image, or ``None``).
    """
    vox_root = os.path.expanduser(vox_root)
    if not os.path.isdir(vox_root):
        raise MissingDataError(f"no folder {vox_root} (expected ShapeNetVox32-style "
                               f"<synset>/<model>/model.binvox)")
    out = []
    for cat in categories:
        synset = SHAPENET_SYNSETS.get(cat, cat)
        folder = os.path.join(vox_root, synset)
        if not os.path.isdir(folder):
            raise MissingDataError(f"no category folder {folder} for {cat!r}")
        models = sorted(m for m in os.listdir(folder)
                        if os.path.isfile(os.path.join(folder, m, "model.binvox")))
        if not models:
            raise MissingDataError(f"no <model>/model.binvox under {folder}")
        for model in models[:per_category]:
            vox = read_binvox(os.path.join(folder, model, "model.binvox"))["voxels"]
            img = None
            if render_root:
                path = os.path.join(os.path.expanduser(render_root), synset, model, "rendering",
                                    f"{view:02d}.png")
                if os.path.isfile(path):
                    img = read_image(path)
            out.append({"category": cat, "model": model, "voxels": vox, "view": img})
    return out


def voxels_to_sdf(voxels: np.ndarray, truncation: float) -> np.ndarray:
    """Truncated signed distance (negative inside) of a voxel grid in ``[-1, 1]^3``
    (grid spacing ``2 / (d - 1)``), from Euclidean distance transforms."""
    import scipy.ndimage as ndi
    h = 2.0 / (voxels.shape[0] - 1)
    inside = ndi.distance_transform_edt(voxels) * h
    outside = ndi.distance_transform_edt(~voxels) * h
    sdf = np.where(voxels, -(inside - 0.5 * h), outside - 0.5 * h)
    return np.clip(sdf, -truncation, truncation)


def shapenet_level_set_data(root: str, rng, per_category: int, grid: int, truncation: float,
                            render_root: Optional[str] = None):
    """The level-set example's data dict from ShapeNet voxels (see
    :func:`load_shapenet_voxels`); ``root`` may hold ``ShapeNetVox32/`` and
    ``ShapeNetRendering/`` or be the voxel folder itself.  Features: the rendered view
    (grey, 16 x 16) when present, else a depth image of the voxels along ``+z``."""
    from reference_layers.kernels.marching_cubes import marching_cubes
    root = os.path.expanduser(root)
    vox_root = os.path.join(root, "ShapeNetVox32") if os.path.isdir(
        os.path.join(root, "ShapeNetVox32")) else root
    if render_root is None and os.path.isdir(os.path.join(root, "ShapeNetRendering")):
        render_root = os.path.join(root, "ShapeNetRendering")
    cats = [c for c in SHAPENET_SYNSETS
            if os.path.isdir(os.path.join(vox_root, SHAPENET_SYNSETS[c]))]
    if not cats:
        raise MissingDataError(f"{vox_root} has none of the synset folders "
                               f"{SHAPENET_SYNSETS} (car, chair, bottle, sofa)")
    models = load_shapenet_voxels(vox_root, cats, render_root, per_category)
    data = {"features": [], "sdf": [], "train_points": [], "eval_points": [], "category": [],
            "depth": []}
    h = 2.0 / (grid - 1)
    for item in models:
        vox = item["voxels"]
        if vox.shape != (grid,) * 3:
            raise DatasetError(f"{item['model']}: voxels {vox.shape}, the example needs "
                               f"{(grid,) * 3}")
        sdf = voxels_to_sdf(vox, truncation)
        hit = vox.any(axis=2)
        depth = np.where(hit, np.argmax(vox, axis=2) / (grid - 1), 1.0)
        view = _grey(item["view"]) if item["view"] is not None else depth
        data["features"].append(resize(view, (16, 16)).ravel())
        data["depth"].append(resize(view, (32, 32)))
        mc = marching_cubes(sdf, 0.0, (h, h, h))
        if len(mc.verts) == 0:
            raise DatasetError(f"{item['model']}: empty voxel grid (no surface)")
        pts = mc.verts[rng.choice(len(mc.verts), size=2600)] - 1.0
        data["sdf"].append(sdf)
        data["train_points"].append(pts[:600])
        data["eval_points"].append(pts[600:])
        data["category"].append(cats.index(item["category"]))
    out = {k: np.asarray(v) for k, v in data.items() if k not in ("train_points", "eval_points")}
    out["train_points"], out["eval_points"] = data["train_points"], data["eval_points"]
    return out, tuple(cats)


# ------------------------------------------------------------------------------
# CUB-200-2011 keypoints (graph matching)
# ------------------------------------------------------------------------------

def _read_table(path: str, columns: int) -> List[List[str]]:
    if not os.path.isfile(path):
        raise MissingDataError(f"no file {path} (CUB-200-2011 layout: images.txt, "
                               f"image_class_labels.txt, parts/part_locs.txt, images/)")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < columns:
                raise DatasetError(f"{path}:{number}: expected {columns} columns, got "
                                   f"{len(parts)}: {line.strip()!r}")
            rows.append(parts)
    return rows


def load_cub(root: str, n_parts: int = 15) -> Dict[int, dict]:
    """CUB-200-2011 annotations: ``{image_id: {path, class_id, parts (n_parts, 2)
    pixel (x, y), visible (n_parts,) bool}}``."""
    root = os.path.expanduser(root)
    images = {int(r[0]): os.path.join(root, "images", r[1])
              for r in _read_table(os.path.join(root, "images.txt"), 2)}
    labels = {int(r[0]): int(r[1])
              for r in _read_table(os.path.join(root, "image_class_labels.txt"), 2)}
    out = {i: {"path": p, "class_id": labels.get(i), "parts": np.zeros((n_parts, 2)),
               "visible": np.zeros(n_parts, bool)} for i, p in images.items()}
    for r in _read_table(os.path.join(root, "parts", "part_locs.txt"), 5):
        img, part = int(r[0]), int(r[1])
        if img not in out:
            raise DatasetError(f"part_locs.txt names image {img}, which images.txt lacks")
        if not 1 <= part <= n_parts:
            raise DatasetError(f"part_locs.txt: part id {part} outside 1..{n_parts}")
        out[img]["parts"][part - 1] = (float(r[2]), float(r[3]))
        out[img]["visible"][part - 1] = bool(int(float(r[4])))
    missing = [i for i, v in out.items() if v["class_id"] is None]
    if missing:
        raise DatasetError(f"image_class_labels.txt lacks image(s) {missing[:5]}")
    return out


def _descriptor(grey: np.ndarray, x: float, y: float, patch: int) -> np.ndarray:
    padded = np.pad(grey, patch, mode="edge")
    xi, yi = int(round(x)) + patch, int(round(y)) + patch
    yi, xi = min(max(yi, patch), padded.shape[0] - patch - 1), min(max(xi, patch),
                                                                   padded.shape[1] - patch - 1)
    p = padded[yi - patch:yi + patch + 1, xi - patch:xi + patch + 1].ravel()
    p = p - p.mean()
    return p / (np.linalg.norm(p) + 1e-8)


def cub_pairs(data: Dict[int, dict], rng, count: int, min_common: int = 4, patch: int = 5
              ) -> List[dict]:
    """``count`` matching instances from random same-class image pairs with at least
    ``min_common`` parts visible in both: nodes are the common parts (all inliers),
    graph 2 permuted; node features are normalized grey patch descriptors.

    Returns dicts with ``points1, points2, F1, F2, X_true, inliers1``.
    """
    by_class: Dict[int, List[int]] = {}
    for i, v in data.items():
        by_class.setdefault(v["class_id"], []).append(i)
    classes = [c for c, ids in by_class.items() if len(ids) >= 2]
    if not classes:
        raise DatasetError("CUB: no class has two images; pairs need two images of a class")
    cache: Dict[int, np.ndarray] = {}

    def grey(i):
        if i not in cache:
            cache[i] = _grey(read_image(data[i]["path"]))
        return cache[i]

    out, tries = [], 0
    while len(out) < count:
        tries += 1
        if tries > 50 * count + 100:
            raise DatasetError(f"CUB: found only {len(out)} of {count} pairs with >= "
                               f"{min_common} common visible parts")
        c = classes[rng.integers(len(classes))]
        a, b = rng.choice(by_class[c], size=2, replace=False)
        common = np.flatnonzero(data[a]["visible"] & data[b]["visible"])
        if len(common) < min_common:
            continue
        perm = rng.permutation(len(common))
        p1, p2 = data[a]["parts"][common], data[b]["parts"][common][perm]
        if len(np.unique(p1, axis=0)) < len(p1) or len(np.unique(p2, axis=0)) < len(p2):
            continue                        # coincident keypoints: edge directions undefined
        X_true = np.zeros((len(common), len(common)))
        X_true[np.arange(len(common)), np.argsort(perm)] = 1.0
        out.append({"points1": p1, "points2": p2,
                    "F1": np.stack([_descriptor(grey(a), x, y, patch) for x, y in p1]),
                    "F2": np.stack([_descriptor(grey(b), x, y, patch) for x, y in p2]),
                    "X_true": X_true, "inliers1": np.ones(len(common), bool),
                    "images": (int(a), int(b))})
    return out


# ------------------------------------------------------------------------------
# MNIST IDX (QP)
# ------------------------------------------------------------------------------

def read_idx(path: str) -> np.ndarray:
    """An IDX file (``path`` or ``path + '.gz'``): magic ``0 0 0x08 ndim``, big-endian
    int32 dims, then unsigned bytes."""
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rb") as f:
                data = f.read()
            if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
                raise DatasetError(f"{candidate} is not an unsigned-byte IDX file (magic "
                                   f"{data[:4]!r}, expected 00 00 08 <ndim>)")
            ndim = data[3]
            shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
            if len(data) - 4 - 4 * ndim != int(np.prod(shape)):
                raise DatasetError(f"{candidate}: header says {shape}, the file holds "
                                   f"{len(data) - 4 - 4 * ndim} values")
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    raise MissingDataError(f"no IDX file {path}(.gz); MNIST expects a directory with "
                           f"train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                           f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


def load_mnist(root: str):
    """``(X_train (N, 784) in [0, 1], y_train, X_test, y_test)`` from local IDX files."""
    r = lambda name: read_idx(os.path.join(os.path.expanduser(root), name))
    Xtr = r("train-images-idx3-ubyte").reshape(-1, 784) / 255.0
    Xte = r("t10k-images-idx3-ubyte").reshape(-1, 784) / 255.0
    ytr, yte = r("train-labels-idx1-ubyte").astype(int), r("t10k-labels-idx1-ubyte").astype(int)
    if len(ytr) != len(Xtr) or len(yte) != len(Xte):
        raise DatasetError(f"MNIST in {root}: {len(Xtr)} train images but {len(ytr)} labels, "
                           f"{len(Xte)} test images but {len(yte)} labels")
    return Xtr, ytr, Xte, yte
