"""One exception type per kind of user mistake; the CLI prints them as one line."""


class PrinmixError(Exception):
    """Base class: a problem the user can fix. str(e) names the file and the problem."""


class BudgetError(PrinmixError):
    """The requested ratio cannot be met (e.g. smaller than the fixed metadata of a matrix)."""


class CheckpointError(PrinmixError):
    """A model directory is missing, unreadable, or holds NaN/Inf or an unknown model type."""


class ArchitectureMismatchError(PrinmixError):
    """Base and fine-tune differ in architecture, tensor names or shapes."""


class BaseMismatchError(PrinmixError):
    """A delta file is applied to a base other than the one it was made for."""


class DeltaFormatError(PrinmixError):
    """A delta file is truncated, corrupted, or of an unknown format version."""


class DeltaRangeError(PrinmixError):
    """A fine-tune's delta holds values a method cannot store (beyond its float16 fields or float32 maths)."""


class DeviceError(PrinmixError):
    """The requested device is not available."""


class WholeBudgetWarning(UserWarning):
    """A delta file ended above its whole-delta ratio (toy-sized matrices; pipeline/whole_budget.py, 5.)."""
