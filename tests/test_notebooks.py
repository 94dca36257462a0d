"""launch/*.ipynb run top to bottom in a real Jupyter kernel (nbclient), on the CPU and offline.

Each notebook's cell tagged "parameters" is followed, as papermill does, by an injected cell that
points it at this checkout, skips the pip installs and shortens training to a few steps with a
small evaluation. The test fails if any cell raises, and if a picture the notebook promises is not
displayed (an image/png output) or not written to its workdir.
"""

import base64
import io
import os
import sys

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")

# The VLAP demo's evaluations, small (as tests/helpers.py SMALL_EVAL), without VQA and arithmetic.
VLAP_SMALL = ["--config.eval.evals=('captioning', 'retrieval')", "--config.eval.max_images=30",
              "--config.eval.batch_size=8", "--config.eval.captioning.max_images=8",
              "--config.eval.captioning.num_beams=(1, 2)",
              "--config.eval.captioning.max_new_tokens=3", "--config.eval.captioning.num_show=4",
              "--config.eval.retrieval.similarities=('word_scores',)",
              "--config.eval.retrieval.num_show=3", "--config.data.batch_size=8"]


def kernel_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8 fake devices
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def execute(name: str, parameters: dict, tmp_path) -> nbformat.NotebookNode:
    """Runs launch/<name> with ``parameters`` injected after its "parameters" cell."""
    nb = nbformat.read(os.path.join(LAUNCH, name), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=kernel_env())  # raises CellExecutionError on the first failing cell
    return nb


def displayed_images(nb) -> list[np.ndarray]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get(
                    "data", {}):
                png = base64.b64decode(o["data"]["image/png"])
                out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return out


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    for name in ("colab.ipynb", "vlap_colab.ipynb"):
        nb = nbformat.read(os.path.join(LAUNCH, name), as_version=4)
        nbformat.validate(nb)
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, name
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, name


def test_lqae_notebook_runs_and_shows_the_reconstructions(tmp_path):
    workdir = tmp_path / "lqae"
    nb = execute("colab.ipynb", dict(REPO_DIR=REPO, WORKDIR=str(workdir), STEPS=4, INSTALL=False,
                                     EXTRA=["--config.eval.evals=('reconstruction',)",
                                            "--config.eval.num_batches=1",
                                            "--config.eval.num_images=4"]), tmp_path)
    pngs = sorted(workdir.glob("reconstructions_*.png"))
    assert [p.name for p in pngs] == ["reconstructions_000004.png"]
    shown = displayed_images(nb)
    assert len(shown) == 1, "the notebook promises one picture: the reconstructions"
    on_disk = np.asarray(Image.open(pngs[0]).convert("RGB"))
    np.testing.assert_array_equal(shown[0], on_disk)
    assert on_disk.shape[0] >= 5 * 64  # a title row and 4 digits of >= 64 px
    text = printed(nb)
    assert "reconstruction @ step 4" in text and "image 0:" in text  # the table, the words


def test_vlap_notebook_falls_back_to_the_demo_and_shows_its_pictures(tmp_path):
    mine = tmp_path / "my_images"
    mine.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # "your own images": photos of any size, resized for the demo's encoder
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(mine / f"{i}.png")
    workdir = tmp_path / "vlap"
    nb = execute("vlap_colab.ipynb", dict(REPO_DIR=REPO, WORKDIR=str(workdir), DEMO_STEPS=3,
                                          INSTALL=False, MY_IMAGES=str(mine), EXTRA=VLAP_SMALL),
                 tmp_path)
    text = printed(nb)
    assert "FALLING BACK TO THE OFFLINE DEMO" in text and "CPU" in text
    assert "captioning @ step 3" in text and "retrieval @ step 3" in text
    shown = displayed_images(nb)
    names = ("captions", "retrieval_t2i", "retrieval_i2t")
    files = [workdir / f"{n}_000003.png" for n in names] + [
        tmp_path / "vlap_mine" / "captions_000003.png"]
    assert all(f.exists() for f in files), [f for f in files if not f.exists()]
    assert len(shown) == len(files), "three pictures of the held-out digits, one of your images"
    for picture, path in zip(shown, files):
        np.testing.assert_array_equal(picture, np.asarray(Image.open(path).convert("RGB")))
    # Your images, resized to the demo's 16 px, are shown at 64 px: two rows of >= 64 px.
    assert shown[-1].shape[0] >= 2 * 64


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
