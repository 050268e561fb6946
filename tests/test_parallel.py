"""Data parallelism on 8 simulated CPU devices: txt2img, img2img and inpainting give the same images as on 1
device, and a batch of 5 (padded to 8, trimmed back) works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from sdjax import pipeline as sdp

    folder, out = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    prompts = ["a red cube", "a blue sphere", "a green cone", "a lighthouse", "a fox"]
    kw = dict(steps=3, height=64, width=64, seeds=[5, 6, 7, 8, 9], scheduler="euler_a", progress=False)
    eight = sdp.load_pipeline(folder, compilation_cache="off")
    one = sdp.load_pipeline(folder, devices=jax.devices()[:1], compilation_cache="off")
    g8 = eight.txt2img(prompts, **kw)  # 5 images on 8 devices: padded to 8, trimmed back to 5
    g1 = one.txt2img(prompts, **kw)
    g8_first = eight.txt2img(prompts[:1], **{**kw, "seeds": [5]})
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8))
    masks = [np.zeros((64, 64), bool) for _ in range(5)]
    for i, m in enumerate(masks):
        m[8 * i:8 * i + 24, 16:48] = True
    tasks = {}
    for name, p in (("eight", eight), ("one", one)):
        tasks[name + "_i2i"] = p.img2img(images, prompts, 0.6, **kw).pixels
        tasks[name + "_inp"] = p.inpaint(images, masks, prompts, **kw).pixels
    np.savez(out, eight=g8.pixels, one=g1.pixels, eight_first=g8_first.pixels,
             sharded=len(eight.params["unet"]["conv_in"]["kernel"].sharding.device_set), **tasks)
""")


def test_eight_devices_match_one(tiny_sd_folder, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "out.npz"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_sd_folder), str(out)], env=env, check=True,
                   timeout=600)
    r = np.load(out)
    assert r["eight"].shape == r["one"].shape == (5, 64, 64, 3)
    assert int(r["sharded"]) == 8  # params really are on all 8 devices
    assert np.max(np.abs(r["eight"] - r["one"])) <= 1e-4  # float rounding only: far below one 8-bit level (3.9e-3)
    assert np.max(np.abs(r["eight_first"][0] - r["eight"][0])) <= 1e-4  # float rounding only: far below one 8-bit level (3.9e-3)
    assert np.abs(r["eight"][0] - r["eight"][1]).mean() > 0.01
    for task in ("i2i", "inp"):
        assert r[f"eight_{task}"].shape == (5, 64, 64, 3)
        # float rounding only: far below one 8-bit level (3.9e-3)
        assert np.max(np.abs(r[f"eight_{task}"] - r[f"one_{task}"])) <= 1e-4
