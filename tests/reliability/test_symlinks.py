"""One rule for links in a class-per-folder tree, files and folders alike: followed while they stay
inside the data folder; links that leave it, dangle or loop are skipped, counted and never read."""

import os

from pipeline.data.sources import list_class_folders
from tests.conftest import write_image


def test_links_inside_are_followed_and_the_others_are_skipped_with_a_reason(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    for c in ("a", "b"):
        for i in range(3):
            write_image(root / c / f"{i}.png", seed=i)
    write_image(outside / "secret.png", seed=9)
    write_image(outside / "more" / "x.png", seed=8)
    write_image(root / "shared" / "s.png", seed=7)  # a folder of its own, also reached through a link
    os.symlink(root / "a" / "0.png", root / "b" / "link_inside.png")          # file link inside: followed
    os.symlink(outside / "secret.png", root / "a" / "leak.png")               # file link out: skipped
    os.symlink(outside / "more", root / "a" / "more")                          # folder link out: skipped
    os.symlink(root / "shared", root / "b" / "shared_link")                    # folder link inside: followed
    os.symlink(root / "a" / "gone.png", root / "a" / "dangling.png")           # dangling: skipped
    os.symlink(root / "b", root / "b" / "loop")                                # loop: skipped
    os.symlink(outside, root / "c_outside")                                    # a class folder that leaves: skipped
    skipped = []
    classes, files, _ = list_class_folders(root, skipped)
    assert classes == ["a", "b", "shared"]
    names = {c: sorted(os.path.relpath(f, root) for f in fs) for c, fs in zip(classes, files)}
    assert names["a"] == ["a/0.png", "a/1.png", "a/2.png"]
    assert names["b"] == ["b/0.png", "b/1.png", "b/2.png", "b/link_inside.png", "b/shared_link/s.png"]
    reasons = {os.path.relpath(s["path"], root): s["reason"] for s in skipped}
    assert reasons == {
        "a/leak.png": "link leaves the data folder",
        "a/more": "link leaves the data folder",
        "a/dangling.png": "dangling link",
        "b/loop": "link loop (folder already listed)",
        "c_outside": "link leaves the data folder",
    }
