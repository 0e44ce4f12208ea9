"""The errors an input can cause, and the one way a config dataclass validates itself.

Every config dataclass checks its values in ``__post_init__`` with ``require``; the app runner
(``data_pipeline.app``) turns these errors into one line and exit code 2.
"""

from typing import Any


class InputError(ValueError):
    """An input that cannot be used (a path, a file, a dataset); the message names it and says
    what to do."""


class ConfigError(InputError):
    """A config value that Hydra's types accept but that cannot run; the message names the
    ``section.key`` and a fix."""


def require(config: Any, section: str, checks: list[tuple[bool, str, str]]) -> None:
    """Raises one ConfigError listing every ``(ok, key, requirement)`` of ``config`` that fails,
    each as ``section.key=value requirement`` (``section`` is "" for top-level keys)."""
    prefix = f"{section}." if section else ""
    problems = [
        f"{prefix}{key}={getattr(config, key)!r} {why}" for ok, key, why in checks if not ok
    ]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
