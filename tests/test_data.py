"""sdjax.data: caption conventions, preprocessing, deterministic order and positions, bad images, caching."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from sdjax import data

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def gradient_image(w: int, h: int) -> Image.Image:
    """Red increases left to right, green top to bottom: crops and flips are visible in the pixels."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def make_txt_folder(root, n: int = 6, size=(24, 16)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"caption {i}\n")
    return root


def test_captions_from_txt_files(tmp_path):
    folder = make_txt_folder(tmp_path / "d", 3)
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "x.jpg")
    (folder / "sub" / "x.txt").write_text("in a subfolder")
    examples = data.scan_folder(folder)
    assert [e.caption for e in examples] == ["caption 0", "caption 1", "caption 2", "in a subfolder"]


def test_missing_caption_fails_naming_the_file(tmp_path):
    folder = make_txt_folder(tmp_path / "d", 2)
    Image.new("RGB", (8, 8)).save(folder / "orphan.webp")
    with pytest.raises(ValueError, match="orphan.webp"):
        data.scan_folder(folder)


def test_captions_from_metadata_jsonl(tmp_path):
    folder = tmp_path / "d"
    (folder / "train").mkdir(parents=True)
    rows = []
    for i, name in enumerate(["b.jpg", "a.png", "train/c.jpeg"]):
        Image.new("RGB", (10, 10), COLOURS[i]).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"text {name}"}))
    Image.new("RGB", (10, 10)).save(folder / "unlisted.png")
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    examples = data.scan_folder(folder)
    assert [(e.path.name, e.caption) for e in examples] == [
        ("a.png", "text a.png"), ("b.jpg", "text b.jpg"), ("c.jpeg", "text train/c.jpeg")]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        data.scan_folder(folder)


def test_images_are_float_nhwc_in_range_and_center_cropped(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    gradient_image(64, 32).save(folder / "g.png")
    (folder / "g.txt").write_text("g")
    ds = data.ImageCaptionDataset(folder, 16)
    x = ds.load(0)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    # 64x32 -> 32x16 then the middle 16 columns: red spans roughly the middle half of the range.
    red = (x[8, :, 0] + 1) * 127.5
    assert 50 < red[0] < 90 and 165 < red[-1] < 205
    batch, _ = next(ds.batches(2))
    assert batch["pixels"].shape == (2, 16, 16, 3) and batch["caption"] == ["g", "g"]


def test_non_square_resolution(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    gradient_image(40, 40).save(folder / "g.png")
    (folder / "g.txt").write_text("g")
    assert data.ImageCaptionDataset(folder, (8, 16)).load(0).shape == (8, 16, 3)


def test_random_crops_and_flips_depend_on_seed_epoch_example(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(4):
        gradient_image(48, 32).save(folder / f"g{i}.png")
        (folder / f"g{i}.txt").write_text("g")
    ds = data.ImageCaptionDataset(folder, 16, crop="random", random_flip=True, seed=3)
    seen = {ds.load(i, e).tobytes() for i in range(4) for e in range(6)}
    assert len(seen) > 4  # crops/flips vary across examples and epochs
    again = data.ImageCaptionDataset(folder, 16, crop="random", random_flip=True, seed=3)
    for i, e in [(0, 0), (2, 5), (3, 1)]:
        np.testing.assert_array_equal(ds.load(i, e), again.load(i, e))
    flips = [ds.augmentation(i, e)[1] for i in range(4) for e in range(20)]
    assert 0.2 < np.mean(flips) < 0.8
    flipped = next((i, e) for i in range(4) for e in range(20) if ds.augmentation(i, e)[1])
    red = ds.load(*flipped)[8, :, 0]
    assert red[0] > red[-1]  # flipped: red now decreases left to right
    plain = data.ImageCaptionDataset(folder, 16)
    assert not any(plain.augmentation(i, e)[1] for i in range(4) for e in range(5))


def test_order_depends_only_on_seed_and_epoch(tmp_path):
    folder = make_txt_folder(tmp_path / "d", 6)
    a = data.ImageCaptionDataset(folder, 8, seed=1)
    b = data.ImageCaptionDataset(folder, 8, seed=1)
    for epoch in range(3):
        np.testing.assert_array_equal(a.order(epoch), b.order(epoch))
        assert sorted(a.order(epoch)) == list(range(6))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), data.ImageCaptionDataset(folder, 8, seed=2).order(0))


def test_batches_cross_epochs_and_resume_from_a_position(tmp_path):
    folder = make_txt_folder(tmp_path / "d", 5)
    ds = data.ImageCaptionDataset(folder, 8, seed=0)
    stream = ds.batches(3)
    full = [next(stream) for _ in range(6)]  # 18 examples: 3 full epochs and a bit
    indices = np.concatenate([b["index"] for b, _ in full])
    np.testing.assert_array_equal(indices[:15], np.concatenate([ds.order(e) for e in range(3)]))
    assert full[1][1] == data.DataPosition(1, 1)
    pos = data.DataPosition.from_dict(json.loads(json.dumps(full[2][1].to_dict())))
    resumed = ds.batches(3, pos)
    for batch, p in full[3:]:
        b2, p2 = next(resumed)
        np.testing.assert_array_equal(b2["pixels"], batch["pixels"])
        assert b2["caption"] == batch["caption"] and p2 == p


def corrupt_folder(tmp_path):
    folder = make_txt_folder(tmp_path / "d", 4)
    raw = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (folder / "img2.png").write_bytes(b"not an image at all")
    return folder


def test_bad_images_skipped_with_warning(tmp_path):
    folder = corrupt_folder(tmp_path)
    ds = data.ImageCaptionDataset(folder, 8, bad_images="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = ds.batches(2)
        seen = np.concatenate([next(batches)[0]["index"] for _ in range(4)])
    assert set(seen) == {0, 3}
    messages = " ".join(str(w.message) for w in caught)
    assert "img1.png" in messages and "img2.png" in messages
    assert len(caught) == 2  # each bad image reported once


def test_bad_images_fail_clearly(tmp_path):
    folder = corrupt_folder(tmp_path)
    ds = data.ImageCaptionDataset(folder, 8, bad_images="error")
    with pytest.raises(data.BadImageError, match=r"img[12]\.png"):
        for _ in zip(range(4), ds.batches(2)):
            pass


def test_all_bad_images_is_an_error(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"junk")
    (folder / "a.txt").write_text("a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable examples"):
            next(data.ImageCaptionDataset(folder, 8).batches(1))


def fake_encoders():
    calls = []

    def images(pixels, idx):
        calls.append(len(idx))
        return pixels[:, ::4, ::4, :].mean(-1, keepdims=True).repeat(4, -1) + idx[:, None, None, None]

    def captions(texts):
        return np.asarray([[[len(t), i] for i in range(3)] for t in texts], np.float32)

    return images, captions, calls


def test_cache_in_memory_and_file(tmp_path):
    folder = corrupt_folder(tmp_path)
    ds = data.ImageCaptionDataset(folder, 8, seed=4)
    images, captions, calls = fake_encoders()
    path = tmp_path / "cache.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = ds.cache(images, captions, path=path, batch_size=8)
    assert calls == [2] and path.is_file()
    np.testing.assert_array_equal(cached.order(2), ds.order(2))
    batch, _ = next(cached.batches(2, data.DataPosition(1, 0)))
    assert batch["latents"].shape == (2, 2, 2, 4) and batch["context"].shape == (2, 3, 2)
    assert set(batch["index"]) <= {0, 3}
    again = ds.cache(images, captions, path=path)
    assert calls == [2]  # reused from the file
    np.testing.assert_array_equal(again.latents, cached.latents)
    ds.cache(images, captions, path=path, mode="sample")  # another mode: recomputed
    assert calls == [2, 2]


def test_cache_refuses_random_augmentation(tmp_path):
    folder = make_txt_folder(tmp_path / "d", 2)
    images, captions, _ = fake_encoders()
    for kwargs in ({"random_flip": True}, {"crop": "random"}):
        with pytest.raises(ValueError, match="random crops and flips"):
            data.ImageCaptionDataset(folder, 8, **kwargs).cache(images, captions)


def test_scan_folder_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.scan_folder(tmp_path / "nowhere")
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    with pytest.raises(NotADirectoryError, match="is a file"):
        data.scan_folder(tmp_path / "one.png")
    folder = make_txt_folder(tmp_path / "d", 2)
    (folder / "img1.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"img1\.txt.*UTF-8"):
        data.scan_folder(folder)


@pytest.mark.parametrize("row, match", [
    ({"file_name": "../outside.png", "text": "x"}, "inside"),
    ({"file_name": "/abs/a.png", "text": "x"}, "inside"),
    ({"file_name": "a.png", "text": None}, "must be strings"),
    ({"file_name": 3, "text": "x"}, "must be strings"),
], ids=["parent", "absolute", "text-null", "name-number"])
def test_metadata_rows_must_name_files_inside_with_text(tmp_path, row, match):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"metadata\.jsonl:1: .*{match}"):
        data.scan_folder(folder)


def test_check_decodes_every_image_up_front(tmp_path):
    folder = corrupt_folder(tmp_path)
    with pytest.raises(data.BadImageError, match=r"img1\.png"):  # the first bad one in file order
        data.ImageCaptionDataset(folder, 8, bad_images="error").check()
    ds = data.ImageCaptionDataset(folder, 8, bad_images="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds.check() is ds
        seen = np.concatenate([next(ds.batches(2))[0]["index"] for _ in range(2)])
    assert ds.bad == {1, 2} and set(seen) <= {0, 3}
    assert len(caught) == 2  # warned once each, at the check
    good = make_txt_folder(tmp_path / "good", 3)
    assert data.ImageCaptionDataset(good, 8).check().bad == set()


def shared_batches(datasets, rows, batch_size, steps, position=data.DataPosition()):
    """Each dataset in its own thread draws `steps` batches loading only its `rows`, agreeing on bad images
    through a barrier (as processes do through `parallel.all_processes_max`); -> per caller, its (batch,
    position) list or the exception it raised."""
    barrier = threading.Barrier(len(datasets), timeout=60)
    masks = [None] * len(datasets)

    def run(k):
        def agree(mask):
            masks[k] = mask
            barrier.wait()
            agreed = np.max(np.stack(masks), axis=0)
            barrier.wait()  # every caller has read the masks before any writes the next one
            return agreed

        stream = datasets[k].batches(batch_size, position, rows=rows[k], agree=agree)
        try:
            return [next(stream) for _ in range(steps)]
        except Exception as e:  # noqa: BLE001 - returned to the test (callers fail together, after agreeing)
            return e

    with concurrent.futures.ThreadPoolExecutor(len(datasets)) as pool:
        return list(pool.map(run, range(len(datasets))))


def test_rows_of_shared_batches_are_those_of_the_whole_batches(tmp_path, monkeypatch):
    folder = make_txt_folder(tmp_path / "d", 5)
    settings = {"crop": "random", "random_flip": True, "seed": 3}
    whole = list(zip(range(6), data.ImageCaptionDataset(folder, 8, **settings).batches(4, data.DataPosition(0, 2))))
    decoded = []
    read = data.read_image
    monkeypatch.setattr(data, "read_image", lambda path: decoded.append(path.name) or read(path))
    parts = [data.ImageCaptionDataset(folder, 8, **settings) for _ in range(2)]
    rows = [[0, 1], [2, 3]]
    got = shared_batches(parts, rows, 4, 6, data.DataPosition(0, 2))
    assert len(decoded) == 6 * 4  # every example of the 6 batches decoded once, by one caller
    for step, (batch, position) in whole:
        for k in range(2):
            part, part_position = got[k][step]
            assert part_position == position  # the same (global) positions everywhere
            np.testing.assert_array_equal(part["index"], batch["index"][rows[k]])
            np.testing.assert_array_equal(part["pixels"], batch["pixels"][rows[k]])
            assert part["caption"] == [batch["caption"][r] for r in rows[k]]
    with pytest.raises(ValueError, match="ascending"):
        next(parts[0].batches(4, rows=[2, 1]))


def test_bad_images_in_shared_batches_are_skipped_alike(tmp_path):
    folder = corrupt_folder(tmp_path)  # img1, img2 bad; nothing checked up front
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = [next(b) for b in [data.ImageCaptionDataset(folder, 8, seed=5).batches(2)] for _ in range(5)]
    parts = [data.ImageCaptionDataset(folder, 8, seed=5) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = shared_batches(parts, [[0], [1]], 2, 5)
    for step, (batch, position) in enumerate(whole):
        for k in range(2):
            assert got[k][step][1] == position
            np.testing.assert_array_equal(got[k][step][0]["index"], batch["index"][[k]])
    assert parts[0].bad == parts[1].bad == {1, 2}
    assert sorted(str(w.message).split("'")[1].rsplit("/", 1)[1] for w in caught) == ["img1.png", "img2.png"]

    failing = [data.ImageCaptionDataset(folder, 8, seed=5, bad_images="error") for _ in range(2)]
    errors = shared_batches(failing, [[0], [1]], 2, 5)
    assert all(isinstance(e, data.BadImageError) for e in errors), errors
    assert len({str(e).split("'")[1] for e in errors}) == 1  # every caller names the same image


def test_cached_shared_batches_index_rows(tmp_path):
    folder = corrupt_folder(tmp_path)
    images, captions, _ = fake_encoders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = data.ImageCaptionDataset(folder, 8, seed=4).cache(images, captions)
    whole = [b for _, b in zip(range(3), cached.batches(2, data.DataPosition(1, 0)))]
    rows = [b for _, b in zip(range(3), cached.batches(2, data.DataPosition(1, 0), rows=[1]))]
    for (batch, position), (part, part_position) in zip(whole, rows):
        assert part_position == position
        np.testing.assert_array_equal(part["latents"], batch["latents"][[1]])
        np.testing.assert_array_equal(part["index"], batch["index"][[1]])
