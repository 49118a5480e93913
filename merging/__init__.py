"""Weight-space merges of fine-tuned models, streamed tensor by tensor (no jobs, no HTTP)."""
__version__ = "0.1.0"

from core.errors import CheckpointError

from .checkpoint import CheckpointReader, CheckpointWriter, write_checkpoint  # noqa: E402
from .engine import merge  # noqa: E402
from .methods import METHODS, get_method  # noqa: E402
from .spec import MergeSpec, ModelRef, OutputSpec  # noqa: E402

__all__ = ["merge", "MergeSpec", "ModelRef", "OutputSpec", "METHODS", "get_method", "CheckpointError",
           "CheckpointReader", "CheckpointWriter", "write_checkpoint", "__version__"]
