"""recbole_mm: transferable multi-modal sequential recommenders as a RecBole plugin."""

__version__ = "0.1.0"

from recbole_mm import compat as _compat

_compat.apply()


def load(checkpoint, data_path=None, device=None, catalogue=None, plm_suffix=None, img_suffix=None):
    """A :class:`recbole_mm.recommend.Recommender` for ``checkpoint``: ``recommend(histories, k)``,
    ``sequence_embeddings``, ``item_embeddings``, ``with_catalogue`` (see ``recbole_mm.recommend``)."""
    from recbole_mm.recommend import load as _load

    return _load(checkpoint, data_path=data_path, device=device, catalogue=catalogue,
                 plm_suffix=plm_suffix, img_suffix=img_suffix)
