"""The one error family users see: a MergeCliError prints as one line and exits with code 2."""

from __future__ import annotations


class MergeCliError(Exception):
    """A user-facing error: the message names what (file, key, tensor) and what to do."""

    exit_code = 2


class RecipeError(MergeCliError):
    """The recipe is malformed or names something that does not exist."""


class CheckpointError(MergeCliError):
    """A checkpoint is missing, unreadable, malformed or hostile."""


class PlanError(MergeCliError):
    """The recipe is valid, but the checkpoints cannot be merged as asked (shapes, names, layers)."""


class OutputError(MergeCliError):
    """The output location cannot be written as asked."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
