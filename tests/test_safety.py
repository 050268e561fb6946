"""The safety checker (`sdjax.safety`) against diffusers' torch `StableDiffusionSafetyChecker` and transformers'
CLIPImageProcessor, and in the pipeline (flagged images black and reported; off by keyword / attribute)."""

from __future__ import annotations

import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax import io, safety
from tests import reference as ref

TINY = safety.SafetyConfig.tiny()


def torch_checker(seed: int = 0):
    """diffusers' checker with every parameter random (the thresholds are set by each test)."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    cfg = transformers.CLIPConfig(vision_config=TINY.to_transformers()["vision_config"],
                                  projection_dim=TINY.projection_dim)
    return ref.randomize_(StableDiffusionSafetyChecker(cfg).eval(), seed)


def clip_processor(size: int):
    import transformers

    with warnings.catch_warnings():  # "requires torchvision (not installed); falling back to ...Pil"
        warnings.simplefilter("ignore")
        return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def random_images(n: int, seed: int, size=(48, 64)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # smooth random images (so they differ in more than noise)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        noise = rng.integers(0, 40, (*size, 3))
        img = np.asarray(Image.fromarray(small).resize(size[::-1], Image.BILINEAR), np.int64)
        out.append(Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)))
    return out


def torch_similarities(model, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(ref.nchw(pixel_values))[1])
        return (cosine_distance(emb, model.special_care_embeds).numpy(),
                cosine_distance(emb, model.concept_embeds).numpy())


def set_thresholds(model, special: np.ndarray, concepts: np.ndarray) -> None:
    with torch.no_grad():
        model.special_care_embeds_weights.copy_(torch.from_numpy(np.asarray(special, np.float32)))
        model.concept_embeds_weights.copy_(torch.from_numpy(np.asarray(concepts, np.float32)))


def torch_flags(model, pixel_values: np.ndarray) -> list[bool]:
    images = np.ones((len(pixel_values), 8, 8, 3), np.float32)
    _, flags = model(clip_input=ref.nchw(pixel_values), images=images)
    return [bool(f) for f in flags]


def straddling_thresholds(special: np.ndarray, concepts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Thresholds under which exactly one image k gets "special care" and is flagged only because of its +0.01,
    and the other images' concept scores fall on both sides of 0 (all well clear of the rounding boundary)."""
    noise = np.random.default_rng(seed).uniform(-0.02, 0.02, concepts.shape[1]).astype(np.float32)
    top = concepts - noise  # [B, 17]
    order = np.argsort(special[:, 0])
    k = int(order[-1])  # the image most like special-care concept 0
    assert special[k, 0] - special[order[-2], 0] > 0.004  # room for a threshold between it and the next
    s = np.full(special.shape[1], 1.5, np.float32)  # cosine similarity <= 1: never
    s[0] = special[k, 0] - 0.002
    base = top[k].max() + 0.005  # image k: -0.005 without the adjustment, +0.005 with it
    return s, (base + noise).astype(np.float32), k


def test_preprocessing_matches_clip_image_processor():
    rng = np.random.default_rng(0)
    for size, shape in ((32, (48, 64)), (32, (80, 33)), (32, (32, 32)), (224, (512, 512)), (224, (512, 768))):
        images = [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)) for _ in range(2)]
        want = clip_processor(size)(images, return_tensors="np").pixel_values  # [B, 3, H, W]
        got = safety.Preprocess.tiny(size)(images)
        assert got.shape == (2, size, size, 3)
        assert ref.max_err(got, np.transpose(want, (0, 2, 3, 1))) <= 1e-5, (size, shape)


def test_preprocessor_config_files(tmp_path):
    """SD1.5's own preprocessor_config.json (an old CLIPFeatureExtractor: int size and crop) and a new one."""
    sd15 = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
            "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(safety.CLIP_MEAN),
            "image_std": list(safety.CLIP_STD), "resample": 3, "size": 224}
    assert safety.Preprocess.from_config(sd15) == safety.Preprocess.sd15()
    clip_processor(224).save_pretrained(tmp_path)
    assert safety.Preprocess.from_config(io.read_json(tmp_path / "preprocessor_config.json")) == safety.Preprocess()
    with pytest.raises(ValueError, match="'size'"):
        safety.Preprocess.from_config({**sd15, "size": "big"})


def test_checker_matches_diffusers(tmp_path):
    model = torch_checker(seed=4)
    images = random_images(8, seed=2)
    pre = safety.Preprocess.tiny(TINY.image_size)
    pixel_values = pre(images)
    special, concepts = torch_similarities(model, pixel_values)
    s_thr, c_thr, k = straddling_thresholds(special, concepts, seed=2)
    set_thresholds(model, s_thr, c_thr)
    model.save_pretrained(tmp_path / "checker")  # transformers 5 layout: vision_model.*
    checker = safety.Checker.from_folder(tmp_path / "checker", None)
    sims = checker.similarities(pixel_values)
    assert ref.max_err(sims.special, special) <= 1e-5 and ref.max_err(sims.concepts, concepts) <= 1e-5

    verdict = checker.check(images)
    want = torch_flags(model, pixel_values)
    assert list(verdict.nsfw) == want
    assert any(want) and not all(want), want
    adjust = np.where((special - s_thr > 0.0005).any(1), 0.01, 0.0)[:, None]
    assert ref.max_err(verdict.concept_scores, concepts - c_thr + adjust) <= 1e-4
    assert ref.max_err(verdict.special_scores, special - s_thr) <= 1e-4
    assert want[k] and 0 < verdict.concept_scores[k].max() < 0.01  # flagged only through its special care

    # Sensitivity: the flags follow the thresholds, still as the reference's.
    for shift in (-0.5, 0.02, 0.5):
        set_thresholds(model, s_thr, c_thr + shift)
        got = safety.flags(sims, s_thr, c_thr + shift).nsfw
        assert list(got) == torch_flags(model, pixel_values)
        assert list(got) != want
    assert all(safety.flags(sims, s_thr, c_thr - 0.5).nsfw) and not any(safety.flags(sims, s_thr, c_thr + 0.5).nsfw)


def test_loading_is_strict_and_reads_old_layouts(tmp_path):
    model = torch_checker(seed=4)
    model.save_pretrained(tmp_path / "new")
    state = io.read_safetensors(tmp_path / "new" / "model.safetensors")
    cfg, params = safety.load(tmp_path / "new")
    assert cfg == TINY
    # SD1.5's files (transformers 4): `vision_model.vision_model.*`, with the position_ids buffer
    old = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in state.items()}
    old["vision_model.vision_model.embeddings.position_ids"] = np.arange(TINY.num_positions, dtype=np.float32)[None]
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
    io.write_safetensors(old, tmp_path / "old" / "model.safetensors")
    _, old_params = safety.load(tmp_path / "old")
    jax.tree.map(np.testing.assert_array_equal, params, old_params)
    # round trip through sdjax's writer
    safety.save(tmp_path / "ours", cfg, params)
    np.testing.assert_array_equal(io.read_safetensors(tmp_path / "ours" / "model.safetensors")["concept_embeds"],
                                  state["concept_embeds"])
    # strict: an unknown key, a missing key, a wrong shape all name the key
    for bad, name in (({**state, "extra.weight": np.zeros(1, np.float32)}, "extra.weight"),
                      ({k: v for k, v in state.items() if k != "concept_embeds"}, "concept_embeds"),
                      ({**state, "concept_embeds_weights": np.zeros(16, np.float32)}, "concept_embeds_weights")):
        io.write_safetensors(bad, tmp_path / "old" / "model.safetensors")
        with pytest.raises(io.CheckpointError, match=name):
            safety.load(tmp_path / "old")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent XLA cache shared with tests/test_from_png.py: every generation here and there is the same
    program (64x64, 3 steps, one image, the tiny model's PNDM), compiled once per session."""
    return str(tmp_path_factory.getbasetemp() / "xla-tiny-64-3")


@pytest.fixture(scope="module")
def checked_folder(tiny_sd_folder, tmp_path_factory):
    """The tiny SD model with a tiny safety checker and its feature extractor beside it."""
    folder = tmp_path_factory.mktemp("checked") / "model"
    shutil.copytree(tiny_sd_folder, folder)
    torch_checker(seed=5).save_pretrained(folder / "safety_checker")
    clip_processor(TINY.image_size).save_pretrained(folder / "feature_extractor")
    return folder


def save_thresholds(folder, concepts: float | np.ndarray, special: float = 1.5) -> None:
    cfg, params = safety.load(folder / "safety_checker")
    params = {**params, "concept_embeds_weights": np.broadcast_to(np.float32(concepts), (safety.NUM_CONCEPTS,)),
              "special_care_embeds_weights": np.full(safety.NUM_SPECIAL, special, np.float32)}
    safety.save(folder / "safety_checker", cfg, params)


def test_pipeline_blacks_out_flagged_images(checked_folder, xla_cache):
    from sdjax import pipeline as sdp

    pipe = sdp.load_pipeline(checked_folder, compilation_cache=xla_cache)
    checker = pipe.safety_checker
    assert isinstance(checker, safety.Checker)
    prompts = ["a red cube", "a blue sphere", "a green cone", "a lighthouse"]

    def run(i):  # one image per call: the program the CLI runs too
        return pipe.txt2img(prompts[i], steps=3, height=64, width=64, seeds=[i], progress=False)

    pipe.safety_checker = None  # off per pipeline
    raw = [run(i) for i in range(4)]
    assert raw[0].nsfw is None

    # thresholds splitting these four images, written to the folder and loaded from there
    sims = checker.similarities(checker.preprocess([r.images[0] for r in raw]))
    top = np.asarray(sims.concepts).max(1)
    threshold = np.sort(top)[1:3].mean()
    save_thresholds(checked_folder, threshold)
    pipe.safety_checker = sdp.load_pipeline(checked_folder, compilation_cache="off").safety_checker
    want = list(top > threshold)
    assert sum(want) == 2
    for i, flagged in enumerate(want):
        out = run(i)
        assert out.nsfw == [flagged]
        if flagged:
            assert not out.pixels.any() and not np.asarray(out.images[0]).any()
        else:
            np.testing.assert_array_equal(out.pixels, raw[i].pixels)
            np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(raw[i].images[0]))
    assert sdp.load_pipeline(checked_folder, compilation_cache="off", safety_checker=False).safety_checker is None


def test_cli_reports_flagged_images(checked_folder, xla_cache, tmp_path, capsys):
    """Thresholds of -1 flag everything: the CLI writes a black image, says so and records it in the PNG."""
    from sdjax import cli, pngmeta

    folder = tmp_path / "model"
    shutil.copytree(checked_folder, folder)
    save_thresholds(folder, -1.0)
    base = ["generate", "a cat", "--model", str(folder), "--seed", "5", "--steps", "3", "--height", "64",
            "--width", "64", "--cache-dir", xla_cache, "--no-progress"]
    assert cli.main([*base, "--out", str(tmp_path / "on")]) == 0
    err = capsys.readouterr().err
    (png,) = sorted((tmp_path / "on").iterdir())
    assert f"safety checker flagged {png}" in err
    with Image.open(png) as img:
        assert not np.asarray(img).any()
    assert pngmeta.read_parameters(png)["Safety checker"] == "flagged"
    # --no-safety-checker: the pipeline the CLI loads has none (it would write the image as it is)
    args = cli.build_parser().parse_args([*base, "--no-safety-checker"])
    assert args.no_safety_checker and cli.load(args).safety_checker is None
