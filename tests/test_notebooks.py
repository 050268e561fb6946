"""notebooks/*.ipynb: committed without outputs, and each runs top to bottom on the tiny model, offline.

The execution tests run a Jupyter kernel (nbclient) with SDJAX_NOTEBOOK_MODEL pointing at the tiny random
model folder, so every notebook takes its small settings (64 px, a few steps); each compiles several jitted
programs, hence `slow`. A cell error fails the test; the images the notebook shows must not be blank.
"""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("txt2img.ipynb", "lora_finetune.ipynb", "research_building_blocks.ipynb")
MIN_STD = 8.0  # pixel std (0-255) below which a shown image counts as blank (a flat colour, all black)

nbformat = pytest.importorskip("nbformat")


def _images(nb) -> list[tuple[int, np.ndarray]]:
    """(cell index, [H, W, 3] uint8) of every image/png output."""
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "image/png" in data:
                png = base64.b64decode(data["image/png"])
                out.append((i, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))))
    return out


def test_the_three_notebooks_exist():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_cleared_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_the_tiny_model(name, tiny_sd_folder, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    # The kernel inherits this environment: the tiny local model, no network, the CPU, temp files in tmp_path.
    monkeypatch.setenv("SDJAX_NOTEBOOK_MODEL", str(tiny_sd_folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    images = _images(nb)
    assert images, f"{name} shows no images"
    for i, img in images:
        assert img.std() > MIN_STD, f"{name} cell {i} shows a blank image (pixel std {img.std():.2f})"
    if name == "lora_finetune.ipynb":
        plot_cells = [i for i, c in enumerate(nb.cells) if "loss-plot" in c.metadata.get("tags", [])]
        assert len(plot_cells) == 1
        assert any(i == plot_cells[0] for i, _ in images), "the loss plot cell shows no plot"
