"""The errors a user sees: one clear message and an exit code (the CLI and the Airflow tasks map them)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed gate: the CLI prints it as one clear message and exits with `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class TryAgain(Exception):
    """Another writer was in the way and this step changed nothing: rerunning it later is safe. The CLI exits 75
    (EX_TEMPFAIL); Airflow retries it like any transient failure."""

    code = 75


class GateFailed(UserError):
    """A data-quality gate failed: nothing downstream runs or is published. Exit code 1; never retried.
    `check`: the gate's ledger entry, when a writer's gate failed before its commit."""

    def __init__(self, message: str, check: dict | None = None):
        super().__init__(message, code=1)
        self.check = check
