"""What images and labels exist, and in which split.

Every source ends as a :class:`SourceListing`: class names plus ``(path, label, split)`` items.
Downloads are checksummed and cached; archives are extracted only when no member could escape
the target directory.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline import storage
from pipeline.config import DataConfig, redact
from pipeline.data import synthetic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLITS = ("train", "val", "test")

TF_FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
TF_FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWERS102_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS102_FILES = {  # name -> sha256, as published with the dataset's TFDS checksums
    "102flowers.tgz": "2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246",
    "imagelabels.mat": "4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d",
    "setid.mat": "46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd",
}


class DataError(ValueError):
    """Input data that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Item:
    path: str
    label: int
    split: str


CONTENT_HASH_LIMIT = 4 << 30  # bytes of source images hashed by content when checking for reusable shards


@dataclass
class SourceListing:
    root: str
    class_names: list[str]
    items: list[Item]
    ignored: list[str] = field(default_factory=list)  # non-image files, not errors
    links_skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: see list_class_folders
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: {c: 0 for c in self.class_names} for s in SPLITS}
        for it in self.items:
            out[it.split][self.class_names[it.label]] += 1
        return out

    def fingerprint(self) -> str:
        """sha256 over each file's relative path, label, split, size and content.

        Content, not modification time, up to ``CONTENT_HASH_LIMIT`` bytes of source files (about
        0.5 s for tf_flowers' 197 MB): a dataset copied afresh (a new node, ``cp`` without ``-p``)
        is the same dataset and reuses its shards. Larger trees fall back to size + mtime, since
        reading every byte on each invocation would cost minutes there.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        h.update("\0".join(self.class_names).encode())
        ordered = sorted(self.items, key=lambda i: i.path)
        stats = [os.stat(it.path) for it in ordered]
        by_content = sum(st.st_size for st in stats) <= CONTENT_HASH_LIMIT
        h.update(b"content\n" if by_content else b"mtime\n")
        for it, st in zip(ordered, stats):
            rel = os.path.relpath(it.path, self.root)
            if by_content:
                with open(it.path, "rb") as f:
                    stamp = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
            else:
                stamp = str(st.st_mtime_ns)
            h.update(f"{rel}\0{st.st_size}\0{stamp}\0{it.label}\0{it.split}\n".encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint


# ----------------------------------------------------------------------------- downloads


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, directory: str | Path, sha256: str | None, filename: str | None = None) -> Path:
    """Fetch ``url`` into ``directory`` (cached), verifying ``sha256``; a mismatch removes the file."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (filename or PurePosixPath(urllib.request.urlparse(url).path).name)
    if target.is_file() and (sha256 is None or sha256_file(target) == sha256):
        return target
    partial = target.with_name(target.name + ".part")
    h = hashlib.sha256()
    try:
        from tqdm import tqdm

        with urllib.request.urlopen(url, timeout=60) as resp, open(partial, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}", file=sys.stderr) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DataError(redact(f"could not download {url}: {exc}. Download it by hand and set data.path to the file.")) from None
    if sha256 is not None and h.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {redact(url)}: expected sha256 {sha256}, got {h.hexdigest()}; "
            "the partial file was removed. Retry, or check the URL."
        )
    partial.replace(target)
    return target


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a tar archive into ``target``, refusing links, devices, absolute or escaping paths.

    Nothing is written unless every member passes; extraction goes to a temporary directory that
    is renamed into place, so an interrupted extraction never looks complete.
    """
    archive, target = Path(archive), Path(target)
    if target.is_dir():
        return target
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot open archive {archive}: {exc}") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            name = PurePosixPath(m.name)
            if m.issym() or m.islnk():
                raise DataError(f"refusing archive {archive}: member '{m.name}' is a link")
            if name.is_absolute() or m.name.startswith(("/", "\\")) or (len(m.name) > 1 and m.name[1] == ":"):
                raise DataError(f"refusing archive {archive}: member '{m.name}' has an absolute path")
            if ".." in name.parts:
                raise DataError(f"refusing archive {archive}: member '{m.name}' escapes the target directory")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"refusing archive {archive}: member '{m.name}' is not a regular file or directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tar.extractall(tmp, members=members, filter="data")
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# ----------------------------------------------------------------------------- listings


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_images(folder: Path, root_real: str, skipped: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """Images and other files under ``folder``, following links only while they stay inside the
    data root (files and folders alike, as archives refuse links that leave theirs); links that
    leave it, dangle or loop are skipped with the reason."""
    images, others = [], []
    seen_dirs: set[str] = set()

    def inside(real: str) -> bool:
        return real == root_real or real.startswith(root_real + os.sep)

    def visit(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen_dirs:
            skipped.append({"path": str(directory), "reason": "link loop (folder already listed)"})
            return
        seen_dirs.add(real)
        for entry in sorted(directory.iterdir()):
            if entry.is_symlink():
                target = os.path.realpath(entry)
                if not os.path.exists(target):
                    skipped.append({"path": str(entry), "reason": "dangling link"})
                    continue
                if not inside(target):
                    skipped.append({"path": str(entry), "reason": "link leaves the data folder"})
                    continue
            if entry.is_dir():
                visit(entry)
            elif entry.is_file():
                (images if _is_image(entry) else others).append(str(entry))

    visit(folder)
    return images, others


def list_class_folders(root: str | Path, links_skipped: list[dict[str, str]] | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """Class names (sorted sub-folder names), each class's sorted image paths, and ignored files.

    Links are followed while they stay inside ``root``; the ones that leave it, dangle or loop are
    appended to ``links_skipped`` with the reason (and never read)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist or is not a directory")
    root_real = os.path.realpath(root)
    skipped = links_skipped if links_skipped is not None else []
    classes = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.is_symlink() and not (os.path.realpath(p) + os.sep).startswith(root_real + os.sep):
            skipped.append({"path": str(p), "reason": "link leaves the data folder"})
            continue
        classes.append(p.name)
    if not classes:
        raise DataError(f"no class folders in {root}: expected one sub-folder of images per class")
    files, ignored = [], []
    for name in classes:
        images, others = _walk_images(root / name, root_real, skipped)
        ignored += others
        if not images:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images")
        files.append(images)
    ignored += [str(p) for p in root.iterdir() if p.is_file()]
    return classes, files, ignored


def split_per_class(files_by_class: list[list[str]], val_fraction: float, test_fraction: float, seed: int) -> list[Item]:
    """The Keras example's rule: per class, sorted names, one seeded shuffle, the first
    ``int(n * val_fraction)`` to validation, the next ``int(n * test_fraction)`` to test."""
    rng = np.random.default_rng(seed)
    items = []
    for label, files in enumerate(files_by_class):
        order = np.array(sorted(files))
        rng.shuffle(order)
        n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
        for i, path in enumerate(order):
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            items.append(Item(str(path), label, split))
    return items


def _folder_listing(root: Path, cfg: DataConfig) -> SourceListing:
    links: list[dict[str, str]] = []
    classes, files, ignored = list_class_folders(root, links)
    items = split_per_class(files, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return SourceListing(str(root), classes, items, ignored, links)


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://", "file://"))


def _tf_flowers(cfg: DataConfig) -> SourceListing:
    cache = Path(cfg.cache_dir).expanduser()
    path = cfg.path or TF_FLOWERS_URL
    if _is_url(path):
        sha = TF_FLOWERS_SHA256 if path == TF_FLOWERS_URL else None
        path = str(download(path, cache / "downloads", sha))
    p = Path(path)
    if not p.exists():
        raise DataError(f"tf_flowers path {p} does not exist: give the flower_photos/ directory, flower_photos.tgz, or a URL")
    if p.is_file():
        p = safe_extract(p, cache / "extracted" / f"{p.name}-{sha256_file(p)[:12]}")
    if (p / "flower_photos").is_dir():  # the archive's top-level folder
        p = p / "flower_photos"
    return _folder_listing(p, cfg)


def _flowers102(cfg: DataConfig) -> SourceListing:
    from scipy.io import loadmat

    if cfg.path and not _is_url(cfg.path):
        root = Path(cfg.path)
        if not root.is_dir():
            raise DataError(f"flowers102 path {root} is not a directory with jpg/, imagelabels.mat and setid.mat")
    else:
        base = cfg.path or FLOWERS102_BASE_URL
        root = Path(cfg.cache_dir).expanduser() / "flowers102"
        for name, sha in FLOWERS102_FILES.items():
            got = download(base.rstrip("/") + "/" + name, root, sha if base == FLOWERS102_BASE_URL else None)
            if name.endswith(".tgz"):
                safe_extract(got, root / "jpg-extracted")
        if not (root / "jpg").is_dir():
            (root / "jpg-extracted" / "jpg").rename(root / "jpg")
    for need in ("jpg", "imagelabels.mat", "setid.mat"):
        if not (root / need).exists():
            raise DataError(f"flowers102 layout incomplete: {root / need} is missing (official layout: jpg/, imagelabels.mat, setid.mat)")
    labels = np.asarray(loadmat(root / "imagelabels.mat")["labels"]).ravel().astype(int)
    setid = loadmat(root / "setid.mat")
    num_classes = int(labels.max())
    items = []
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for image_id in np.asarray(setid[key]).ravel().astype(int):
            path = root / "jpg" / f"image_{image_id:05d}.jpg"
            if not path.is_file():
                raise DataError(f"flowers102: {path} is listed in setid.mat ({key}) but missing")
            items.append(Item(str(path), int(labels[image_id - 1]) - 1, split))
    names = [f"class_{k:03d}" for k in range(1, num_classes + 1)]
    return SourceListing(str(root), names, items)


def _synthetic(cfg: DataConfig, output_dir: str) -> SourceListing:
    s = cfg.synthetic
    # Generated images are read by path, so with outputs in an object store they live in the local cache.
    default_parent = Path(cfg.cache_dir).expanduser() if storage.is_uri(output_dir) else Path(output_dir)
    root = Path(cfg.path or default_parent / "synthetic_source")
    synthetic.generate(root, s.num_classes, s.images_per_class, s.image_size, cfg.seed)
    return _folder_listing(root, cfg)


def resolve_source(cfg: DataConfig, output_dir: str = "outputs") -> SourceListing:
    """List the images of the configured source, downloading or generating them if needed."""
    if cfg.source == "tf_flowers":
        listing = _tf_flowers(cfg)
    elif cfg.source == "flowers102":
        listing = _flowers102(cfg)
    elif cfg.source == "folder":
        listing = _folder_listing(Path(cfg.path), cfg)
    else:
        listing = _synthetic(cfg, output_dir)
    if not listing.items:
        raise DataError(f"no images found for source '{cfg.source}' at {listing.root}")
    check_splits(listing, cfg)
    return listing


def check_splits(listing: SourceListing, cfg: DataConfig) -> None:
    """A classifier needs two classes, each with a training image and, for model selection, a
    validation image: say which class is short and what to change, before any decoding."""
    if len(listing.class_names) < 2:
        raise DataError(f"{listing.root} has {len(listing.class_names)} class ({', '.join(listing.class_names)}); "
                        "a classifier needs at least 2 class folders")
    counts = {(i.label, i.split): 0 for i in listing.items}
    for item in listing.items:
        counts[(item.label, item.split)] += 1
    for label, name in enumerate(listing.class_names):
        total = sum(n for (lab, _), n in counts.items() if lab == label)
        if not counts.get((label, "train")):
            raise DataError(f"class {name!r} has no training image ({total} image(s), all held out); add images "
                            "or lower data.val_fraction / data.test_fraction")
        if not counts.get((label, "val")) and not (cfg.val_fraction == 0 and cfg.source != "flowers102"):
            # val_fraction=0 asks for no validation split (shards for a benchmark, say); the training
            # stages then refuse with their own message, since model selection needs one.
            if cfg.source == "flowers102":
                raise DataError(f"class {name!r} has no validation image in setid.mat")
            need = f"{math.ceil(100 / total) / 100:.2f}" if total > 1 else None  # rounded up: int(n * f) must reach 1
            raise DataError(f"class {name!r} gets no validation image: data.val_fraction={cfg.val_fraction:g} of its "
                            f"{total} image(s) rounds down to 0; "
                            + (f"raise data.val_fraction to at least {need} or add images" if need and float(need) < 1
                               else "add images to it (it needs at least 2)"))
