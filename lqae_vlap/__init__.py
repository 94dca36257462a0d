"""lqae_vlap: frozen language models that see (VLAP and LQAE) in JAX/Flax."""

import os as _os

# transformers warns at import when PyTorch is missing ("Models won't be available and only
# tokenizers, configuration and file/data utilities can be used"): true, and all we use of it
# (our models are Flax), so on the core install (no torch) every run began with a warning about
# nothing it does. That message is transformers' only "advisory" warning (logger.warning_advice,
# transformers 5.x), which this variable turns off; a value the user set is kept.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
