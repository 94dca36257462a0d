"""lqae_vlap: frozen language models that see (VLAP and LQAE) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="lqae_vlap",
    version="0.1.0",
    description="VLAP and LQAE in JAX/Flax: frozen language models that see.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lqae_vlap", "lqae_vlap.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "ml_collections>=1.0",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # tensorflow-datasets builders import it without declaring it
        "einops>=0.8",
        "gguf>=0.10",  # GGUF checkpoints (llama.cpp) read and dequantised by models/gguf.py
        "absl-py",
        "numpy",
        "safetensors",
        "pillow",
        "scikit-learn",  # the demo's real images (handwritten digits)
        "scipy",  # Student-t intervals of the few-shot evaluation
        "pycocoevalcap>=1.2",  # COCO caption metrics; METEOR, SPICE and the PTB tokenizer need Java
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "dm-pix>=0.4",  # PSNR and SSIM (DeepMind's JAX image library; adds only chex and toolz)
        # data.worker_processes (the paper configs' default): IndexedBatches' batches computed
        # in grain's worker processes. Adds cloudpickle, etils, portpicker, array-record (tfds's).
        "grain>=0.2.18",
    ],
    extras_require={
        # torch is the parity reference for our Flax models (transformers' PyTorch classes).
        # accelerate: transformers needs it to read GGUF files (the SmolLM2 parity test).
        # scikit-image: the reference for dm-pix's PSNR / SSIM. nbclient + ipykernel + nbformat:
        # tests/test_notebooks.py runs launch/*.ipynb top to bottom in a real kernel.
        "test": ["pytest", "torch==2.13.0", "accelerate", "scikit-image", "nbclient", "nbformat",
                 "ipykernel"],
        # bench/ops.py times ott-jax's Sinkhorn beside ours when it is installed.
        "bench": ["ott-jax"],
        # gs:// workdirs (TPU pods): metrics, evaluation files and orbax's checkpoints go
        # through fsspec, which needs gcsfs for Google Cloud Storage.
        "gcs": ["gcsfs"],
        # --config.plan.target=tpu:...: libtpu compiles the train step for a TPU topology on a
        # machine without one. jax[tpu] pins the libtpu of the installed jax; installed, every
        # jax start probes for a TPU (plan mode itself runs on CPU), so a pip --target folder
        # named by --config.plan.libtpu is the alternative.
        "tpu-plan": ["jax[tpu]"],
    },
)
