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
