"""The errors ptlab reports as one line: a config that cannot run, a stage that diverged."""


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names the full key."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the message names the stage, the step and the likely key."""
