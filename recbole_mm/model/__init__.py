"""Models (one per file) and the blocks they share (``layers.py``)."""


def our_models() -> dict:
    """Our model classes by name (the registry of :mod:`recbole_mm.utils`), each imported."""
    from recbole_mm.utils import _MODEL_MODULES, get_model

    return {name: get_model(name) for name in _MODEL_MODULES}


def language_models() -> tuple[str, ...]:
    """Names of our language-model recommenders (``IS_LANGUAGE_MODEL``: Recformer, ReoLM)."""
    from recbole_mm.model.abstract import is_language_model

    return tuple(name for name, cls in our_models().items() if is_language_model(cls))
