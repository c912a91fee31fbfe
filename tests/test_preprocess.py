"""The Ray Data stage on a local Ray: exact round-trip, manifest, reuse, --force, interruption."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.data import preprocess as prep
from pipeline.data.columns import fixed_size_binary_column, gather_binary
from pipeline.data.loading import load_split, read_manifest
from pipeline.data.sources import DataError
from tests.conftest import write_image


def _cfg(tmp_path, root, *extra):
    return load_config(
        None,
        [f"output_dir={tmp_path / 'out'}", "data.source=folder", f"data.path={root}", "data.image_size=24",
         "data.val_fraction=0.2", "data.test_fraction=0.1", "data.rows_per_shard=7", *extra],
    )


def _pil_reference(path, size, mode="squash"):
    with Image.open(path) as img:
        img = img.convert("RGB")
        if mode == "squash":
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img)


@pytest.fixture
def dirty_tree(folder_tree):
    """The folder tree plus a corrupt file, a zero-byte file and odd image modes."""
    (folder_tree / "astilbe" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder_tree / "bellflower" / "empty.png").write_bytes(b"")
    write_image(folder_tree / "crocus" / "grey.png", seed=5, mode="L")
    write_image(folder_tree / "crocus" / "palette.gif", seed=6, mode="P", fmt="GIF")
    return folder_tree


def test_round_trip_manifest_and_skips(ray_local, tmp_path, dirty_tree):
    cfg = _cfg(tmp_path, dirty_tree)
    result = prep.preprocess(cfg, log=lambda *_: None)
    manifest = read_manifest(result["shard_dir"])
    assert manifest["num_skipped"] == 2
    assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == ["broken.jpg", "empty.png"]
    assert all(s["reason"] for s in manifest["skipped"])
    assert manifest["num_ignored_non_images"] == 2
    assert sum(manifest["split_sizes"].values()) == 32  # 30 + grey + palette
    assert manifest["class_names"] == ["astilbe", "bellflower", "crocus"]
    assert manifest["image_shape"] == [24, 24, 3]
    # several shards per split (rows_per_shard=7), and a fingerprint of source + config
    assert len(manifest["files"]["train"]) >= 3 and len(manifest["config_fingerprint"]) == 64
    seen = {}
    for split in ("train", "val", "test"):
        part = load_split(result["shard_dir"], split)
        assert len(part) == manifest["split_sizes"][split]
        for class_idx, name in enumerate(manifest["class_names"]):
            assert int((part.labels == class_idx).sum()) == manifest["counts"][split][name]
        for img, label, path in zip(part.images.numpy(), part.labels.tolist(), part.paths):
            assert np.array_equal(img, _pil_reference(path, 24)), path  # pixels survive exactly
            assert Path(path).parent.name == manifest["class_names"][label]  # never a mislabel
            seen[path] = split
    assert len(seen) == 32  # splits are disjoint
    assert (Path(result["shard_dir"]) / "config.yaml").is_file()
    # pixels are a fixed-size column (no offsets to parse): Parquet's FIXED_LEN_BYTE_ARRAY
    first = Path(result["shard_dir"]) / manifest["files"]["train"][0]
    schema = pq.ParquetFile(first).schema
    assert schema.column(schema.names.index("image")).physical_type == "FIXED_LEN_BYTE_ARRAY"
    assert pq.read_schema(first).field("image").type == pa.binary(24 * 24 * 3)


def test_shards_of_an_older_format_are_refused_with_the_rebuild_command(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2, "image_shape": [24, 24, 3]}))
    with pytest.raises(DataError, match=r"format 2.*reads format 3.*preprocess --force"):
        read_manifest(str(tmp_path))
    rows = np.arange(2 * 12, dtype=np.uint8).reshape(2, 12)
    variable = pa.chunked_array([pa.array([r.tobytes() for r in rows], type=pa.binary())])  # format 2's column
    with pytest.raises(DataError, match="binary cells, not the manifest's"):
        gather_binary(variable, np.arange(2), (2, 2, 3))
    fixed = pa.chunked_array([fixed_size_binary_column(rows)])
    assert np.array_equal(gather_binary(fixed, np.array([1, 0]), (2, 2, 3)), rows[[1, 0]].reshape(2, 2, 2, 3))


def test_reuse_force_and_rebuild_on_change(ray_local, tmp_path, folder_tree):
    cfg = _cfg(tmp_path, folder_tree)
    first = prep.preprocess(cfg, log=lambda *_: None)
    manifest_file = Path(first["manifest"])
    stamp = manifest_file.stat().st_mtime_ns
    again = prep.preprocess(cfg, log=lambda *_: None)
    assert again["reused"] and again["shard_dir"] == first["shard_dir"]
    assert manifest_file.stat().st_mtime_ns == stamp
    forced = prep.preprocess(cfg, force=True, log=lambda *_: None)
    assert not forced["reused"] and forced["shard_dir"] == first["shard_dir"]
    assert manifest_file.stat().st_mtime_ns != stamp
    # a changed source file or a changed stored size is a different dataset
    write_image(folder_tree / "crocus" / "img_new.png", seed=999)
    changed = prep.preprocess(cfg, log=lambda *_: None)
    assert not changed["reused"] and changed["shard_dir"] != first["shard_dir"]
    resized = prep.preprocess(_cfg(tmp_path, folder_tree, "data.image_size=16"), log=lambda *_: None)
    assert resized["shard_dir"] != changed["shard_dir"]
    assert load_split(resized["shard_dir"], "train").images.shape[1:] == (16, 16, 3)
    # only complete datasets and no partial leftovers are in the shard root
    leftovers = [p for p in os.listdir(tmp_path / "out" / "shards") if p.startswith(".")]
    assert leftovers == []


def test_interrupted_run_leaves_nothing_that_looks_complete(ray_local, tmp_path, folder_tree, monkeypatch):
    cfg = _cfg(tmp_path, folder_tree)
    real_write = prep._write_shards

    def write_then_die(listing, cfg, target):
        real_write(listing, cfg, target)  # the shards are written...
        raise KeyboardInterrupt  # ...and the run dies before the manifest

    monkeypatch.setattr(prep, "_write_shards", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prep.preprocess(cfg, log=lambda *_: None)
    assert not list((tmp_path / "out" / "shards").glob("*/manifest.json"))
    assert list((tmp_path / "out" / "shards").iterdir()) == []
    # a run killed hard (no cleanup) leaves a partial directory: the next run ignores and removes it
    monkeypatch.setattr(prep, "_write_shards", real_write)
    listing = prep.resolve_source(cfg.data, cfg.output_dir)
    dest, fp = prep.shard_dir_for(cfg, listing)
    stale = Path(dest).parent / f".{fp[:16]}.partial-deadbeef"
    (stale / "train").mkdir(parents=True)
    result = prep.preprocess(cfg, log=lambda *_: None)
    assert not result["reused"] and not stale.exists()
    with pytest.raises(DataError, match="manifest.json missing"):
        load_split(str(stale), "train")


def test_ranks_get_disjoint_parts_covering_the_split(ray_local, tmp_path, folder_tree):
    result = prep.preprocess(_cfg(tmp_path, folder_tree), log=lambda *_: None)
    whole = load_split(result["shard_dir"], "train")
    parts = [load_split(result["shard_dir"], "train", rank=r, world_size=3) for r in range(3)]
    paths = [p for part in parts for p in part.paths]
    assert sorted(paths) == sorted(whole.paths) and len(set(paths)) == len(paths)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for part in parts:  # each rank's images still match their labels and paths
        for img, path in zip(part.images.numpy(), part.paths):
            assert np.array_equal(img, whole.images.numpy()[whole.paths.index(path)])
    # Each rank reads only the row groups of its own rows: not the whole split per rank. Ranges
    # share at most a group at each boundary, so all ranks together read well under 2 copies.
    assert all(0 < part.bytes_read < whole.bytes_read for part in parts)
    assert sum(part.bytes_read for part in parts) < 1.6 * whole.bytes_read
    # Rows are stored in a seeded random order, so a rank's range is not one class.
    assert all(len(set(part.labels.tolist())) > 1 for part in parts)


def test_row_order_does_not_depend_on_where_the_photos_lie(ray_local, tmp_path, folder_tree):
    """Each rank trains on a contiguous range of rows, so the stored order must be a function of the
    files and the seed only: the same tree under another path gives the same rows in the same order."""
    import shutil

    moved = tmp_path / "elsewhere" / "a-much-longer-folder-name"
    shutil.copytree(folder_tree, moved)
    here = prep.preprocess(_cfg(tmp_path / "a", folder_tree), log=lambda *_: None)
    there = prep.preprocess(_cfg(tmp_path / "b", moved), log=lambda *_: None)
    for split in ("train", "val"):
        a, b = load_split(here["shard_dir"], split), load_split(there["shard_dir"], split)
        assert [os.path.relpath(p, folder_tree) for p in a.paths] == [os.path.relpath(p, moved) for p in b.paths]
        assert np.array_equal(a.images.numpy(), b.images.numpy())
    # and the seed does change it
    reseeded = prep.preprocess(_cfg(tmp_path / "c", folder_tree, "data.seed=7"), log=lambda *_: None)
    assert load_split(reseeded["shard_dir"], "train").paths != load_split(here["shard_dir"], "train").paths


def test_cli_writes_result_and_config(ray_local, tmp_path, folder_tree, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["preprocess", "data.source=folder", f"data.path={folder_tree}", f"output_dir={out}", "data.image_size=20"])
    assert rc == 0
    result = json.loads((out / "preprocess" / "result.json").read_text())
    assert result["split_sizes"]["train"] + result["split_sizes"]["val"] == 30
    assert "image_size: 20" in (out / "preprocess" / "config.yaml").read_text()
    assert str(out / "preprocess" / "result.json") in capsys.readouterr().out


def test_cli_bad_input_exits_2_with_message(tmp_path, capsys):
    assert cli_main(["preprocess", "data.source=folder", f"data.path={tmp_path / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["preprocess", "data.image_size=-3"]) == 2
    assert "data.image_size" in capsys.readouterr().err


def test_loading_a_part_holds_one_file_of_arrow_data_at_a_time(tmp_path, monkeypatch):
    """A worker's part is copied file by file into one array: the load peaks at the part plus one
    file's table, not at the part twice (every table, then their copy)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic_shards", Path(__file__).parents[1] / "benchmarks" / "synthetic_shards.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    monkeypatch.setattr(synthetic, "ROWS_PER_FILE", 50)
    root = synthetic.write_shards(str(tmp_path / "shards"), 400, 50, 64)  # 8 training files of 50 rows
    file_bytes = 50 * 64 * 64 * 3
    with pytest.raises(ValueError, match="C-contiguous uint8"):  # a copy would leave the caller's array empty
        gather_binary(pq.read_table(os.path.join(root, "train", "part-00000.parquet"))["image"], np.arange(50), (64, 64, 3),
                      out=np.empty((64, 64, 3, 50), dtype=np.uint8).transpose(3, 0, 1, 2))
    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)  # its own peak, counting what Arrow allocates while reading
    pa.set_memory_pool(pool)
    try:
        part = load_split(root, "train", rank=1, world_size=2)
    finally:
        pa.set_memory_pool(default)
    assert pool.bytes_allocated() == 0  # nothing of the tables outlives the load
    assert len(part) == 200 and part.rows == (200, 400) and pool.max_memory() < 2 * file_bytes
    table = pa.concat_tables(pq.read_table(os.path.join(root, "train", f"part-{i:05d}.parquet")) for i in range(4, 8))
    assert part.paths == table["path"].to_pylist() and part.labels.tolist() == table["label"].to_pylist()
    assert np.array_equal(part.images.numpy(), gather_binary(table["image"], np.arange(200), (64, 64, 3)))
