import os

# The suite runs on the host CPU; TPU/GPU programs are compiled for compile-only devices (tests/test_aot.py),
# so the installed TPU and CUDA plugins must not try to start a backend of their own.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu allows one process per machine unless told otherwise; compile-only use needs no exclusive chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest

from tests import reference as ref


@pytest.fixture(scope="session")
def tiny_torch_pipe():
    return ref.tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_sd_folder(tiny_torch_pipe, tmp_path_factory):
    """A tiny random SD pipeline saved in diffusers layout (model_index.json, unet/, vae/, ...)."""
    folder = tmp_path_factory.mktemp("tiny_sd") / "model"
    tiny_torch_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    """The tiny SD pipeline loaded by sdjax, once per test module."""
    from sdjax import pipeline as sdp

    return sdp.load_pipeline(tiny_sd_folder, compilation_cache="off")


@pytest.fixture(scope="module")
def params(pipe):
    """`pipe`'s parameters on the host."""
    import jax

    return jax.device_get(pipe.params)
