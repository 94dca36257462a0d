"""Workdir files on local disks and on object stores (fsspec's memory:// stands in for gs://)."""

import io
import json
import os
import uuid

import numpy as np
import pytest
from PIL import Image

from lqae_vlap.core import files
from lqae_vlap.evals import linear_probe, pictures
from lqae_vlap.train import checkpoint, metrics


@pytest.fixture
def bucket():
    """A fresh object-store folder (fsspec's in-memory filesystem: no append, no local path)."""
    return f"memory://bucket-{uuid.uuid4().hex}"


def test_paths_are_kept_as_urls_and_local_paths_made_absolute(tmp_path, monkeypatch):
    assert files.is_remote("gs://b/run") and not files.is_remote("runs/x")
    assert not files.is_remote("file:///tmp/x")
    assert files.normalize("gs://b/run") == "gs://b/run"  # os.path.abspath would give ./gs:/b/run
    monkeypatch.chdir(tmp_path)
    assert files.normalize("run") == os.path.join(str(tmp_path), "run")
    assert files.join("gs://b/run", "metrics.jsonl") == "gs://b/run/metrics.jsonl"


@pytest.mark.parametrize("where", ["local", "remote"])
def test_write_read_exists_listdir(where, tmp_path, bucket):
    root = str(tmp_path) if where == "local" else bucket
    files.makedirs(files.join(root, "sub"))
    files.write_text(files.join(root, "sub", "a.json"), '{"x": 1}')
    files.write_bytes(files.join(root, "b.bin"), b"\x00\x01")
    assert json.loads(files.read_text(files.join(root, "sub", "a.json"))) == {"x": 1}
    assert files.read_bytes(files.join(root, "b.bin")) == b"\x00\x01"
    assert files.isdir(files.join(root, "sub")) and not files.isdir(files.join(root, "b.bin"))
    assert files.exists(files.join(root, "b.bin")) and not files.exists(files.join(root, "c"))
    assert files.listdir(root) == ["b.bin", "sub"]


@pytest.mark.parametrize("where", ["local", "remote"])
def test_create_exclusive_remove_and_move(where, tmp_path, bucket):
    root = str(tmp_path) if where == "local" else bucket
    files.makedirs(root)
    lock = files.join(root, "lock.json")
    assert files.create_exclusive(lock, "first") and not files.create_exclusive(lock, "second")
    assert files.read_text(lock) == "first"
    files.remove(lock)
    files.remove(lock)  # already gone: fine
    assert files.create_exclusive(lock, "third") and files.read_text(lock) == "third"
    files.makedirs(files.join(root, "ckpt", "3"))
    files.write_text(files.join(root, "ckpt", "3", "a"), "x")
    files.move(files.join(root, "ckpt", "3"), files.join(root, "bad", "3-now"))
    assert files.read_text(files.join(root, "bad", "3-now", "a")) == "x"
    assert not files.exists(files.join(root, "ckpt", "3", "a"))


def test_why_not_writable_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    assert files.why_not_writable_folder(tmp_path / "new" / "deeper") is None
    assert "is a file" in files.why_not_writable_folder(tmp_path / "f")
    assert "which is a file" in files.why_not_writable_folder(tmp_path / "f" / "sub")
    assert files.why_not_writable_folder("gs://bucket/run") is None  # not checked
    assert not (tmp_path / "new").exists()


def test_local_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    files.write_text(path, "old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_append_only_text_on_an_object_store_keeps_lines_across_restarts(bucket):
    path = files.join(bucket, "metrics.jsonl")
    log = files.AppendOnlyText(path, flush_secs=3600)
    log.write("1\n")
    log.write("2\n")
    assert not files.exists(path)  # buffered: the object is rewritten on flush, not per line
    log.flush()
    assert files.read_text(path) == "1\n2\n"
    log.write("3\n")
    log.close()
    again = files.AppendOnlyText(path, flush_secs=0)  # a restarted run appends
    again.write("4\n")  # flush_secs=0: uploaded at once
    assert files.read_text(path) == "1\n2\n3\n4\n"
    again.close()


@pytest.mark.parametrize("where", ["local", "remote"])
def test_metric_writer_and_read_jsonl(where, tmp_path, bucket):
    workdir = str(tmp_path / "run") if where == "local" else bucket + "/run"
    for start in (0, 2):  # a restart appends to the same file
        w = metrics.MetricWriter(workdir, tensorboard=False)
        w.write(start + 1, {"loss": np.float32(0.5), "text": "skipped"})
        w.write(start + 2, {"loss": 0.25})
        w.close()
    records = metrics.read_jsonl(files.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0] == {"step": 1, "loss": 0.5}


@pytest.mark.parametrize("where", ["local", "remote"])
def test_metric_writer_resuming_drops_the_rows_of_steps_it_redoes(where, tmp_path, bucket):
    workdir = str(tmp_path / "run") if where == "local" else bucket + "/run"
    path = files.join(workdir, "metrics.jsonl")
    w = metrics.MetricWriter(workdir, tensorboard=False, resume_step=0)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.close()
    files.write_text(path, files.read_text(path) + '{"step": 6, "lo')  # a kill mid-line
    w = metrics.MetricWriter(workdir, tensorboard=False, resume_step=3)  # resumed from step 3
    for step in (4, 5, 6):
        w.write(step, {"loss": 10.0 * step})
    w.close()
    records = metrics.read_jsonl(path)
    assert [(r["step"], r["loss"]) for r in records] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    metrics.MetricWriter(workdir, tensorboard=False).close()  # an evaluation keeps every row
    assert metrics.read_jsonl(path) == records


def test_find_checkpoint_dir_on_an_object_store(bucket):
    files.makedirs(f"{bucket}/run/checkpoints/5")
    files.write_text(f"{bucket}/run/checkpoints/5/x", "")  # object stores have no empty folders
    files.write_text(f"{bucket}/run/checkpoints/10/x", "")
    assert checkpoint.find_checkpoint_dir(f"{bucket}/run") == (f"{bucket}/run/checkpoints", None)
    assert checkpoint.find_checkpoint_dir(f"{bucket}/run/checkpoints/5") == (
        f"{bucket}/run/checkpoints", 5)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.find_checkpoint_dir(f"{bucket}/elsewhere")


def test_pictures_and_probe_cache_write_to_an_object_store(bucket):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    picture = pictures.reconstructions_picture(images, {"rec": images + 255}, ["a", "b"],
                                               files.join(bucket, "recon.png"))
    png = np.asarray(Image.open(io.BytesIO(files.read_bytes(files.join(bucket, "recon.png")))))
    np.testing.assert_array_equal(png, picture.pixels)

    calls = []

    def compute():
        calls.append(1)
        return np.arange(6.0).reshape(3, 2), np.array([0, 1, 0])

    cache = files.join(bucket, "probe_features")
    first = linear_probe.cached_features(cache, step=3, features="lm_layer", layer=-1,
                                         split="train", compute_fn=compute)
    second = linear_probe.cached_features(cache, step=3, features="lm_layer", layer=-1,
                                          split="train", compute_fn=compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
