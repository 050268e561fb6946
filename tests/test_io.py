"""Tests of sdjax.io: model folders, hub cache, weight discovery, safetensors and JSON files."""

import json
import os
import pathlib

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from huggingface_hub.utils import filter_repo_objects

from sdjax import io

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml",
    "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_flax_model.msgpack",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
SD15_COMMON = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
    "vae/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
}


def _touch(path: pathlib.Path, text: str = "{}") -> pathlib.Path:
    """Creates a small file (and its folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _save(folder: pathlib.Path, name: str, tensors: dict) -> pathlib.Path:
    """Writes tensors with the reference safetensors library."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(folder / name))
    return folder / name


def _fake_snapshot_download(files, root: pathlib.Path, calls: list):
    """A stand-in for snapshot_download that 'downloads' the allowed files of a repo listing."""

    def download(repo_id, *, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append(allow_patterns)
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            _touch(root / name)
        return str(root)

    return download


def _offline_env(monkeypatch, hf_home: pathlib.Path) -> None:
    """Offline hub with an HF_HOME of our own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def test_resolve_model_returns_local_folder(tmp_path, monkeypatch):
    """An existing folder comes back as is, even when shaped like a hub id."""
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert io.resolve_model("owner/name") == pathlib.Path("owner/name")
    assert io.resolve_model(tmp_path) == tmp_path


def test_resolve_model_missing_path_is_not_hub_id(tmp_path):
    """A missing path that is no hub id gives an error naming it and how to pass a folder."""
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(io.ModelNotFoundError, match="does not exist") as err:
        io.resolve_model(missing)
    assert str(missing) in str(err.value) and "--model" in str(err.value)


def test_resolve_model_rejects_single_file(tmp_path):
    """A single-file checkpoint is refused with a hint to use a diffusers folder."""
    ckpt = _touch(tmp_path / "v1-5-pruned.safetensors")
    with pytest.raises(NotADirectoryError, match="diffusers-format folder"):
        io.resolve_model(ckpt)


def test_resolve_model_offline_not_cached(tmp_path, monkeypatch):
    """Offline with an empty cache: a FileNotFoundError naming the id and the local-folder option."""
    _offline_env(monkeypatch, tmp_path / "hf_home")
    with pytest.raises(FileNotFoundError) as err:
        io.resolve_model(SD15_REPO)
    message = str(err.value)
    assert isinstance(err.value, io.ModelNotFoundError)
    assert SD15_REPO in message and "HF_HUB_OFFLINE" in message
    assert "--model /path/to/folder" in message and 'load_pipeline("/path/to/folder")' in message


def test_resolve_model_offline_cached_snapshot(tmp_path, monkeypatch):
    """A snapshot in the hub cache (models--owner--name/snapshots/<hash>, refs/main) resolves offline."""
    _offline_env(monkeypatch, tmp_path / "unused_home")
    cache = tmp_path / "hub_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = cache / "models--owner--tiny-sd"
    _touch(repo_folder / "refs" / "main", commit)
    snapshot = repo_folder / "snapshots" / commit
    _touch(snapshot / "model_index.json", '{"_class_name": "StableDiffusionPipeline"}')
    for component, stem in io.COMPONENT_STEMS.items():
        _save(snapshot / component, f"{stem}.safetensors", {"w": np.zeros(2, np.float32)})
    folder = io.resolve_model("owner/tiny-sd")
    assert folder.resolve() == snapshot.resolve()
    assert io.read_json(folder / "model_index.json")["_class_name"] == "StableDiffusionPipeline"


def test_hub_patterns_skip_checkpoints_and_pickles():
    """On SD1.5's file listing, only configs, tokenizer and non-variant safetensors weights match."""
    fetched = set(filter_repo_objects(SD15_FILES, allow_patterns=io.hub_allow_patterns(None)))
    weights = {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
               "text_encoder/model.safetensors"}
    assert fetched == SD15_COMMON | weights


def test_hub_patterns_fp16_variant():
    """With variant fp16, only the .fp16. safetensors weights match."""
    fetched = set(filter_repo_objects(SD15_FILES, allow_patterns=io.hub_allow_patterns("fp16")))
    weights = {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
               "text_encoder/model.fp16.safetensors"}
    assert fetched == SD15_COMMON | weights


def test_hub_patterns_with_the_safety_checker():
    """load_pipeline's default also fetches the safety checker's safetensors (never its pickles)."""
    for variant, weights in ((None, "safety_checker/model.safetensors"), ("fp16", "safety_checker/model.fp16.safetensors")):
        with_checker = set(filter_repo_objects(SD15_FILES, allow_patterns=io.hub_allow_patterns(variant, safety_checker=True)))
        without = set(filter_repo_objects(SD15_FILES, allow_patterns=io.hub_allow_patterns(variant)))
        assert with_checker - without == {"feature_extractor/preprocessor_config.json", "safety_checker/config.json",
                                          weights}


def test_hub_patterns_match_sharded_names():
    """Sharded checkpoints (plain and variant) and their index files match."""
    files = ["unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.fp16.json"]
    assert set(filter_repo_objects(files, allow_patterns=io.hub_allow_patterns(None))) == set(files[:2])
    assert set(filter_repo_objects(files, allow_patterns=io.hub_allow_patterns("fp16"))) == set(files[2:])


def test_resolve_model_downloads_with_patterns(tmp_path, monkeypatch):
    """A hub id goes through snapshot_download with sdjax's patterns; no multi-GB root checkpoint arrives."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        _fake_snapshot_download(SD15_FILES, tmp_path / "snap", calls))
    folder = io.resolve_model(SD15_REPO, variant="fp16")
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert len(calls) == 1
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in names
    assert not [n for n in names if n.startswith("v1-5") or n.endswith(".bin") or "safety" in n]
    assert io.find_weights(folder / "unet", "diffusion_pytorch_model", "fp16")[0].name.endswith(".fp16.safetensors")


def test_resolve_model_variant_falls_back(tmp_path, monkeypatch):
    """A repo without fp16 weights for a component gets its default weights, with a warning."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files = [f for f in SD15_FILES if f != "vae/diffusion_pytorch_model.fp16.safetensors"]
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(files, tmp_path / "s", calls))
    with pytest.warns(UserWarning, match="vae"):
        folder = io.resolve_model(SD15_REPO, variant="fp16")
    assert len(calls) == 2 and not any("unet/" in p for p in calls[1])
    assert io.find_weights(folder / "vae", "diffusion_pytorch_model", "fp16") == [
        folder / "vae" / "diffusion_pytorch_model.safetensors"]


def test_find_weights_plain(tmp_path):
    """The plain file wins over the fp16 one without a variant."""
    _touch(tmp_path / "diffusion_pytorch_model.safetensors")
    _touch(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert io.find_weights(tmp_path, "diffusion_pytorch_model") == [tmp_path / "diffusion_pytorch_model.safetensors"]


def test_find_weights_fp16_variant_preferred(tmp_path):
    """variant='fp16' prefers the .fp16. file, and falls back to the plain one."""
    _touch(tmp_path / "model.safetensors")
    assert io.find_weights(tmp_path, "model", "fp16") == [tmp_path / "model.safetensors"]
    _touch(tmp_path / "model.fp16.safetensors")
    assert io.find_weights(tmp_path, "model", "fp16") == [tmp_path / "model.fp16.safetensors"]


def test_find_weights_fp16_only(tmp_path):
    """Without a variant, an fp16 file that is the only one is accepted."""
    _touch(tmp_path / "model.fp16.safetensors")
    assert io.find_weights(tmp_path, "model") == [tmp_path / "model.fp16.safetensors"]


@pytest.mark.parametrize("index_name, variant", [
    ("diffusion_pytorch_model.safetensors.index.json", None),
    ("diffusion_pytorch_model.safetensors.index.fp16.json", "fp16"),
    ("diffusion_pytorch_model.fp16.safetensors.index.json", "fp16"),
])
def test_find_weights_sharded(tmp_path, index_name, variant):
    """A sharded index lists its shards once each, in order."""
    shards = ["shard-00002-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    weight_map = {"a": shards[0], "b": shards[1], "c": shards[0]}
    _touch(tmp_path / index_name, json.dumps({"metadata": {}, "weight_map": weight_map}))
    for shard in shards:
        _touch(tmp_path / shard)
    found = io.find_weights(tmp_path, "diffusion_pytorch_model", variant)
    assert found == [tmp_path / shards[1], tmp_path / shards[0]]


def test_find_weights_missing_shard(tmp_path):
    """A shard listed in the index but absent is named in the error."""
    _touch(tmp_path / "model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-1.safetensors"):
        io.find_weights(tmp_path, "model")


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "v1-5-pruned.ckpt", "weights.pt", "unet.pth"])
def test_find_weights_refuses_pickles(tmp_path, name):
    """A folder with only pickled weights gives an error naming the file and how to convert it."""
    _touch(tmp_path / name)
    with pytest.raises(io.PickledWeightsError) as err:
        io.find_weights(tmp_path, "diffusion_pytorch_model")
    message = str(err.value)
    assert name in message and "never unpickles" in message
    assert "save_file" in message and "safe_serialization=True" in message


def test_find_weights_missing(tmp_path):
    """A missing folder, or a folder without weights, is a FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match="nowhere"):
        io.find_weights(tmp_path / "nowhere", "model")
    _touch(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors") as err:
        io.find_weights(tmp_path, "model")
    assert not isinstance(err.value, io.PickledWeightsError)


def _all_dtypes() -> dict[str, np.ndarray]:
    """One small tensor per supported dtype, with non-trivial values."""
    values = np.arange(-3, 9, dtype=np.float64).reshape(3, 4) / 3
    return {
        "f64": values, "f32": values.astype(np.float32), "f16": values.astype(np.float16),
        "bf16": values.astype(ml_dtypes.bfloat16), "i64": np.arange(5, dtype=np.int64) - 2,
        "i32": np.arange(4, dtype=np.int32).reshape(2, 2), "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8), "bool": np.array([True, False]), "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def test_read_reference_safetensors(tmp_path):
    """Files written by the safetensors library read back exactly, dtypes included."""
    tensors = _all_dtypes()
    path = _save(tmp_path, "ref.safetensors", tensors)
    read = io.read_safetensors(path)
    assert set(read) == set(tensors)
    for key, array in tensors.items():
        assert read[key].dtype == array.dtype and read[key].shape == array.shape, key
        np.testing.assert_array_equal(read[key], array)


def test_write_safetensors_readable_by_library(tmp_path):
    """Files sdjax writes are read by the safetensors library, metadata included."""
    tensors = _all_dtypes()
    path = tmp_path / "sub" / "out.safetensors"
    io.write_safetensors(tensors, path, metadata={"format": "flax", "step": 3})
    read = safetensors.numpy.load_file(str(path))
    for key, array in tensors.items():
        assert read[key].dtype == array.dtype, key
        np.testing.assert_array_equal(read[key], array)
    with safetensors.safe_open(str(path), "numpy") as f:
        assert f.metadata() == {"format": "flax", "step": "3"}
    header, metadata, data_start = io.read_safetensors_header(path)
    assert metadata == {"format": "flax", "step": "3"} and data_start % 8 == 0
    for key, entry in header.items():
        assert entry["data_offsets"][0] % tensors[key].dtype.itemsize == 0, key


def test_read_truncated_safetensors(tmp_path):
    """A file cut in half gives an error naming it."""
    path = _save(tmp_path, "cut.safetensors", {"w": np.ones((64, 64), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.SafetensorsError, match="truncated") as err:
        io.read_safetensors(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("payload", [
    b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 32,
    b"\xff" * 64,
    b"abc",
    b"",
])
def test_read_garbage_safetensors(tmp_path, payload):
    """Garbage (bad JSON header, absurd header size, too short) gives an error naming the file."""
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(payload)
    with pytest.raises(io.SafetensorsError) as err:
        io.read_safetensors(path)
    assert str(path) in str(err.value)


def test_read_inconsistent_offsets(tmp_path):
    """A header whose offsets disagree with dtype x shape is refused."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(io.SafetensorsError, match="'w'"):
        io.read_safetensors(path)


def test_read_missing_safetensors(tmp_path):
    """A missing file is a FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        io.read_safetensors(tmp_path / "absent.safetensors")


def test_read_shards_merge_and_reject_duplicates(tmp_path):
    """Shards merge into one dict; a key present in two shards is an error naming it."""
    one = _save(tmp_path, "one.safetensors", {"a": np.ones(2, np.float32)})
    two = _save(tmp_path, "two.safetensors", {"b": np.zeros(3, np.float16)})
    merged = io.read_safetensors([one, two])
    assert sorted(merged) == ["a", "b"] and merged["b"].shape == (3,)
    dup = _save(tmp_path, "dup.safetensors", {"a": np.ones(2, np.float32)})
    with pytest.raises(io.SafetensorsError, match="'a'"):
        io.read_safetensors([one, dup])


def test_write_safetensors_rejects_unsupported_dtype(tmp_path):
    """Complex numbers cannot be stored; nothing is written."""
    with pytest.raises(TypeError, match="complex"):
        io.write_safetensors({"z": np.ones(2, np.complex64)}, tmp_path / "z.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves the old file intact and no temp file behind."""
    path = tmp_path / "w.safetensors"
    io.write_safetensors({"a": np.ones(3, np.float32)}, path)

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        io.write_safetensors({"a": np.zeros(5, np.float32)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    np.testing.assert_array_equal(io.read_safetensors(path)["a"], np.ones(3, np.float32))


def test_json_round_trip_and_errors(tmp_path):
    """write_json/read_json round-trip; missing or invalid JSON errors name the file."""
    obj = {"b": [1, 2.5, None], "a": {"ü": "ß"}}
    io.write_json(obj, tmp_path / "c.json")
    assert io.read_json(tmp_path / "c.json") == obj
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        io.read_json(tmp_path / "missing.json")
    _touch(tmp_path / "broken.json", '{"a": 1,')
    with pytest.raises(ValueError, match="broken.json"):
        io.read_json(tmp_path / "broken.json")


def test_lazy_tensors_spec_and_unreadable_dtypes(tmp_path):
    """spec() gives shape and dtype from the header; a dtype numpy cannot hold (F8) is an error naming it."""
    path = tmp_path / "w.safetensors"
    io.write_safetensors({"a": np.ones((2, 3), ml_dtypes.bfloat16), "b": np.ones(4, ml_dtypes.float8_e4m3fn)}, path)
    lazy = io.LazyTensors(path)
    assert lazy.spec("a") == ((2, 3), "BF16", path) and lazy.spec("b") == ((4,), "F8_E4M3", path)
    assert lazy["a"].dtype == ml_dtypes.bfloat16
    with pytest.raises(io.SafetensorsError, match=r"'b' has dtype F8_E4M3, which sdjax cannot read") as err:
        lazy["b"]
    assert str(path) in str(err.value)


def test_overlapping_offsets_are_refused(tmp_path):
    """Two tensors over the same bytes: the safetensors library refuses the file; the error names the tensor."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(io.SafetensorsError, match=r"tensor 'b' has data_offsets \[0, 8\], which overlap") as err:
        io.read_safetensors(path)
    assert str(path) in str(err.value)


def test_lazy_tensors_read_from_many_threads(tmp_path):
    """Positional reads (no shared file position): tensors read concurrently are exact, in any order."""
    import concurrent.futures

    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((64, 33 + i)).astype(np.float32) for i in range(24)}
    tensors.update(_all_dtypes())
    path = _save(tmp_path, "many.safetensors", tensors)
    lazy = io.LazyTensors(path)
    keys = list(tensors) * 3
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        read = list(pool.map(lambda k: (k, lazy[k]), keys))
    for key, array in read:
        assert array.dtype == tensors[key].dtype and array.flags.writeable, key
        np.testing.assert_array_equal(array, tensors[key])
