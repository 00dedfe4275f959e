"""The errors ptlab reports as one line: a config that cannot run, a store that failed, a stage that diverged."""


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names the full key."""


class StoreError(ConfigError):
    """The tracking store failed while in use (a server that stopped answering, a full disk, a damaged file);
    one line naming ``logger.tracking_uri`` and what failed. A ``ConfigError`` so that every command that reports
    those as one line reports this too."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the message names the stage, the step and the likely key
    (``stage``, ``step``, ``loss``: where the raiser knows them; ``ptlab.engines.base.diverged`` makes the line)."""

    def __init__(self, message: str, stage: str | None = None, step: int | None = None, loss: float | None = None) -> None:
        super().__init__(message)
        self.stage, self.step, self.loss = stage, step, loss

    def __reduce__(self) -> tuple[type, tuple[str, str | None, int | None, float | None]]:
        """Pickled with its fields (a worker process sends it back)."""
        return DivergenceError, (str(self), self.stage, self.step, self.loss)


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM or SIGINT; a ``KeyboardInterrupt`` so that tracking marks its runs KILLED.
    ``exit_code`` is the shell's for that signal: 143 (SIGTERM) or 130 (SIGINT)."""

    @property
    def exit_code(self) -> int:
        return 130 if "SIGINT" in str(self) else 143


def restore_hint(experiment_id: str, uri: str) -> str:
    """How to get a deleted MLflow experiment back, or around it (the end of a one-line error)."""
    return (
        f"restore it (mlflow experiments restore --experiment-id {experiment_id} with MLFLOW_TRACKING_URI={uri}) "
        "or pick another logger.experiment_name"
    )
