"""graphprune: token reduction for transformers as a compiler pass.

    import graphprune
    fast = graphprune.optimize(model, recipe="tome", r=13)
"""

from graphprune import ops  # noqa: F401  (registers the token ops)
from graphprune import kv  # noqa: F401  (registers the KV-cache policies)
from graphprune.api import optimize
from graphprune.errors import (
    ExportError,
    GraphPruneError,
    RecipeError,
    ScheduleError,
    UnsupportedArchitectureError,
    UntrustedFileError,
)
from graphprune.exporters.eager import OptimizedModel, load
from graphprune.exporters.onnx import OnnxModel
from graphprune.recipes import RECIPES, list_recipes, register
from graphprune.schedule.files import Schedule, load_schedule
from graphprune.schedule.tune import tune
from graphprune.prompt import compress_prompt
from graphprune.serving import serve

__version__ = "0.1.0"

__all__ = [
    "ExportError", "GraphPruneError", "OnnxModel", "OptimizedModel", "RECIPES", "RecipeError", "Schedule", "ScheduleError",
    "UnsupportedArchitectureError", "UntrustedFileError", "compress_prompt", "list_recipes", "load", "load_schedule",
    "optimize", "register", "serve",
    "tune",
    "__version__",
]
