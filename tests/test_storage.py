"""The storage layer on a local directory and on an S3 server: the same calls, the same results."""

import os

import pytest

from pipeline import storage
from pipeline.config import ConfigError, load_config


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("object_store")("storage")


def test_uri_paths_keep_their_query_string():
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "teacher", "best") == "s3://bucket/runs/teacher/best?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.uri_for(uri, "bucket/runs/x/y") == "s3://bucket/runs/x/y?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.uri_for("/local/dir", "/local/dir/x") == "/local/dir/x"
    assert storage.abspath(uri) == uri and os.path.isabs(storage.abspath("rel/dir"))
    path, fs = storage.ray_storage(uri)
    assert path == "bucket/runs" and type(fs).__name__ == "S3FileSystem"
    assert storage.ray_storage("rel") == (os.path.abspath("rel"), None)


def test_files_round_trip(base):
    f = storage.join(base, "a", "b.txt")
    assert not storage.exists(f)
    storage.write_text(f, "hello")
    assert storage.read_text(f) == "hello" and storage.is_file(f) and storage.size(f) == 5
    assert storage.is_dir(storage.join(base, "a")) and not storage.is_file(storage.join(base, "a"))
    storage.append_text(storage.join(base, "log.jsonl"), "1\n")
    storage.append_text(storage.join(base, "log.jsonl"), "2\n")
    assert storage.read_text(storage.join(base, "log.jsonl")) == "1\n2\n"
    listed = storage.list_files(base, ".txt")
    assert listed == [f] if storage.is_uri(base) else listed == [os.path.abspath(f)]
    assert storage.read_text(listed[0]) == "hello"  # listed URIs keep the endpoint
    storage.delete_file(f)
    assert not storage.exists(f)
    storage.delete_dir(base)
    assert storage.list_files(base) == []


def test_publish_dir_replaces_the_old_contents_and_uploads_the_marker_last(base, tmp_path, monkeypatch):
    dst = storage.join(base, "best")
    storage.write_text(storage.join(dst, "stale.pt"), "old model")
    src = tmp_path / "new"
    (src / "sub").mkdir(parents=True)
    for name in ("meta.json", "model.pt", "z.txt"):
        (src / name).write_text(name)
    (src / "sub" / "x.bin").write_text("x")
    order = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda path, data: (order.append(path.split("?")[0].rsplit("/", 1)[1]), real(path, data)))
    storage.publish_dir(str(src), dst, last="meta.json")
    names = sorted(p.split("/best/")[1].split("?")[0] for p in storage.list_files(dst))
    assert names == ["meta.json", "model.pt", "sub/x.bin", "z.txt"]  # stale.pt is gone
    if storage.is_uri(dst):
        assert order[-1] == "meta.json" and set(order) == {"meta.json", "model.pt", "z.txt"}
    with storage.local_dir(dst) as local:
        assert sorted(os.listdir(local)) == ["meta.json", "model.pt", "sub", "z.txt"]
        assert open(os.path.join(local, "sub", "x.bin")).read() == "x"
    if storage.is_uri(dst):
        assert not os.path.exists(local)  # the download is removed afterwards


def test_staged_dir_uploads_only_a_completed_block(base):
    target = storage.join(base, "plots")
    with storage.staged_dir(target) as local:
        open(os.path.join(local, "curve.png"), "w").write("png")
    assert storage.read_text(storage.join(target, "curve.png")) == "png"
    if storage.is_uri(target):
        with pytest.raises(RuntimeError):
            with storage.staged_dir(target) as local:
                open(os.path.join(local, "half.png"), "w").write("half")
                raise RuntimeError("plotting failed")
        assert not storage.exists(storage.join(target, "half.png"))


def test_credentials_in_an_output_uri_are_refused_without_echoing_them():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output_dir=s3://AKIAEXAMPLE:topsecret@bucket/runs"])
    assert "credentials" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)
    assert "topsecret" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)  # not even where the override is quoted


def test_a_lock_that_cannot_be_taken_never_stops_the_run(tmp_path):
    from pipeline import storage

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    said, ran = [], []
    with storage.turn_lock(str(blocker / ".locks" / "x.lock"), on_unavailable=said.append):  # no directory can go there
        ran.append(True)
    with storage.turn_lock(None, on_unavailable=said.append):  # an object store: nothing to lock
        ran.append(True)
    assert ran == [True, True] and len(said) == 1 and "Error" in said[0]
