"""Error classes shared across layers (imported by ``model/``, ``trainer/``, ``data/`` and the CLI alike,
so that no layer imports another only for an exception).  Each is one line for the user; the CLI
reports them without a traceback."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (unreadable, not ours, another model or run, weights
    that do not fit); one line, reported by the CLI without a traceback (exit code 2)."""


class ConfigError(ValueError):
    """A config key or value that cannot be used (one line naming the key; exit code 2 from the CLI)."""


class MissingConfigKey(ConfigError, KeyError):
    """A key a model reads that no config layer defines (its default belongs in ``props/<Model>.yaml``
    or ``props/overall.yaml``: models have no in-code fallbacks); a :class:`ConfigError` for the CLI."""

    def __str__(self):  # KeyError quotes its argument; this is a sentence
        return str(self.args[0]) if self.args else ""


class MissingEncoderError(RuntimeError):
    """No local encoder folder to load (the default one is not installed, or a path is not a model folder)."""
