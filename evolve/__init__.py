"""Multi-objective evolutionary search over merge parameters (pymoo), scored by `fitness`."""
from .run import EvolveResult, export, run  # noqa: F401
from .spec import EvolveSpec, SearchSpec  # noqa: F401
