"""User-facing errors. Each carries a hint; the CLI alone turns them into exit codes."""


class LlmtuneError(Exception):
    """A problem the user can fix: bad recipe, missing input, unfinished upstream stage."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class RecipeError(LlmtuneError):
    """The recipe does not validate. `message` lists every problem, one per line."""


class InputError(LlmtuneError):
    """An input (data file, model, upstream stage directory) is missing or malformed."""


class VerificationError(LlmtuneError):
    """An output failed its own check (for example merged logits differ from base+adapter)."""

    exit_code = 3


class Diverged(LlmtuneError):
    """Training met a NaN or infinite loss or gradient norm and stopped before the optimizer
    applied it; the adapter was not written, earlier checkpoints are kept."""

    exit_code = 5


class GotWorse(LlmtuneError):
    """Training made the held-out loss worse than before it: `llmtune run` stops before merge
    and export rather than ship the worse model."""

    exit_code = 7


class RunBusy(LlmtuneError):
    """Another llmtune command is writing the same run folder (run_lock.py)."""

    exit_code = 6


class Interrupted(LlmtuneError):
    """Training stopped on a signal after saving a checkpoint: run again with --resume auto."""

    exit_code = 75  # EX_TEMPFAIL: try again later
