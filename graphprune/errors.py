"""Errors raised by graphprune. Every message says what went wrong and what to do."""


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class UnsupportedArchitectureError(GraphPruneError):
    """The model's graph has a structure that token reduction cannot be applied to safely."""


class RecipeError(GraphPruneError):
    """Unknown recipe, unknown option, or a recipe that does not fit the model."""


class ScheduleError(RecipeError):
    """An impossible schedule: negative r, keep outside (0, 1], too many per-block values..."""


class UntrustedFileError(GraphPruneError):
    """Loading the file would run arbitrary code (pickle) and the caller did not opt in."""


class ExportError(GraphPruneError):
    """An artifact could not be written or did not match the eager model."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty.

    For wrapping another library's (often multi-line) error into one clear graphprune message.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
