"""Bad images and bad archives: converted, or skipped and reported, or refused; never a crash, never a
silent mislabel. (The preprocess stage's handling of a dirty tree, end to end, is
``tests/test_preprocess.py::test_round_trip_manifest_and_skips``.)"""

import hashlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data import images, sources
from pipeline.data.sources import DataError, safe_extract
from tests.conftest import write_image
from tests.test_sources import _make_tgz


# ----------------------------------------------------------------------------- odd and bad files


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_odd_modes_become_rgb(tmp_path, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    if mode == "CMYK":
        path = tmp_path / "x.jpg"
        Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    else:
        path = write_image(tmp_path / "x.png", seed=1, size=(20, 10), mode=mode, fmt=fmt)
    arr = images.load_image(str(path), 8)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    if mode == "CMYK":
        assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60  # red stays red


def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    arr16 = np.full((6, 6), 65535 // 2, dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr16).save(path)
    out = images.load_image(str(path), 6)
    assert 120 <= out.mean() <= 135  # half of full scale, not 255 from clipping


def test_corrupt_truncated_and_empty_files_raise(tmp_path):
    good = write_image(tmp_path / "good.jpg", seed=3, size=(64, 64), fmt="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"this is not a jpeg at all")
    for name in ("trunc.jpg", "empty.jpg", "text.jpg"):
        with pytest.raises(Exception):
            images.load_image(str(tmp_path / name), 16)


# ----------------------------------------------------------------------------- archives and downloads


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_archive_members_escaping_are_refused(tmp_path, name):
    tgz = _make_tgz(tmp_path, {"ok/a.txt": b"a", name: b"evil"})
    with pytest.raises(DataError, match="refusing archive"):
        safe_extract(tgz, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_archive_links_are_refused(tmp_path):
    path = tmp_path / "links.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("flower_photos/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="is a link"):
        safe_extract(path, tmp_path / "out")


def test_download_checksum_mismatch_is_refused_and_removed(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"flowers" * 1000)
    with pytest.raises(DataError, match="checksum mismatch"):
        sources.download(src.as_uri(), tmp_path / "dl", sha256="0" * 64)
    assert list((tmp_path / "dl").iterdir()) == []
    good = sources.download(src.as_uri(), tmp_path / "dl", sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    assert good.read_bytes() == src.read_bytes()


def test_download_failure_is_clear(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        sources.download((tmp_path / "missing.tgz").as_uri(), tmp_path / "dl", sha256=None)


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) is
    decoded as a viewer shows it: the stored left (red) half ends up on top."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    out = images.load_image(str(path), 32, "squash").astype(int)
    top, bottom = out[:12].mean(axis=(0, 1)), out[-12:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
