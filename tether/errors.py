"""The project's own errors: one base class, :class:`TetherError`, that the CLI turns into a few
lines naming what was wrong, where, and what was expected (exit status 2, no traceback; ``--debug``
or ``TETHER_DEBUG=1`` shows the traceback).

Every error a user can cause is a ``TetherError``: a bad config (:class:`tether.runs.ConfigError`),
bad data (:class:`tether.data.DataError`), a reward function that fails
(:class:`tether.rewards.RewardError`), and the kinds below. Errors from libraries that a user can
cause (a tokenizer missing from a model directory, a truncated safetensors file, a disk-full
write) are caught where tether calls the library and re-raised as one of these, with the file.

Each class also derives from the builtin it refines (``ValueError``, ``OSError``, …), so code that
caught the builtin before keeps working. This module imports nothing from tether: every package
may use it.
"""

from __future__ import annotations


class TetherError(Exception):
    """Base class of the errors a user can cause and fix; the message says what, where and what
    to do."""


class ModelError(TetherError, ValueError):
    """A model, tokenizer or reward-model directory cannot be loaded (named with the path)."""


class CheckpointError(TetherError, ValueError):
    """A checkpoint is missing, truncated, unreadable or does not fit the run (named with the
    file)."""


class RunDirError(TetherError, OSError):
    """The run directory cannot be used: it is a file, unwritable, locked by another run, or holds
    a run that this one would overwrite or misrepresent."""


class RunExistsError(RunDirError, FileExistsError):
    """``output_dir`` already holds a run and neither ``resume`` nor ``overwrite`` is set."""


class ResumeMismatchError(RunDirError):
    """A run is resumed with a config that differs from the saved one in fields that change the
    training (without ``resume_override=true``)."""


class NumericalError(TetherError, FloatingPointError):
    """Training stopped because of non-finite values (too many bad steps in a row, or weights
    that became non-finite); the message names the cause, the step and the last good checkpoint."""


def describe_os_error(exc: OSError, action: str) -> str:
    """One line for an ``OSError`` raised while ``action`` (e.g. "writing the checkpoint"):
    the file, the system's reason, and a hint for the common causes (disk full, permissions)."""
    import errno

    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    hints = {
        errno.ENOSPC: "free some space or choose another output_dir",
        errno.EDQUOT: "free some space or choose another output_dir",
        errno.EACCES: "check the permissions, or choose another output_dir",
        errno.EPERM: "check the permissions, or choose another output_dir",
        errno.EROFS: "the filesystem is read-only: choose another output_dir",
        errno.ENOTDIR: "a path component is a file, not a directory",
        errno.EISDIR: "expected a file, got a directory",
    }
    hint = hints.get(exc.errno or -1)
    return f"{action}{where}: {reason}" + (f" ({hint})" if hint else "")


class TetherWarning(UserWarning):
    """Something the user should know that does not stop the run (a checkpoint skipped as
    unreadable, a resume with no checkpoint, a KL far above its target); the CLI prints it as
    one ``tether: warning: ...`` line."""
