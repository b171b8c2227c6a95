"""Base class of the recbole_mm models and the model contract.

The contract (class attributes and no-op hooks of :class:`MMSequentialRecommender`, read for any
model class, RecBole's included, through the module-level helpers):

* ``STAGES``: the ``train_stage`` values the model supports (:func:`model_stages`; ``()`` for a
  model without stages, e.g. RecBole's);
* ``IS_LANGUAGE_MODEL``: a language-model recommender (Recformer, ReoLM: :func:`is_language_model`);
* ``CATALOGUE_BUFFERS``: buffers computed from a catalogue's features (MISSRec's interests), not
  weights: dropped when the model transfers or is rebuilt on another catalogue;
* ``on_epoch_start(epoch, train_data=None)``: run by the trainer before every epoch when the model
  overrides it (:func:`epoch_hook`);
* ``frozen_on_transfer()``: the parameters frozen after ``load_pretrained(state_dict, fix_enc=...)``
  (:func:`transfer`), the one path that loads a pre-training checkpoint then freezes.

Models read their keys from the config only (:func:`required`): every default lives in
``props/<Model>.yaml`` or ``props/overall.yaml``.
"""

from __future__ import annotations

from contextlib import contextmanager
from logging import getLogger

import torch
from torch import nn
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_mm.errors import CheckpointError, MissingConfigKey


def required(config, key: str, model: str | type | None = None):
    """``config[key]``, which a config layer must define (a value of ``None`` is a value); a key that
    no layer defines is a :class:`MissingConfigKey` naming the key and the props file it belongs in
    (RecBole's ``Config`` answers ``None`` for any unknown key, which would hide a missing default)."""
    if key not in config:
        name = model.__name__ if isinstance(model, type) else (model or _config_model(config))
        where = f"props/{name}.yaml" if name else "props/<Model>.yaml"
        raise MissingConfigKey(f"config key {key!r} is not set: its default belongs in {where} "
                               f"(or props/overall.yaml); models have no in-code defaults")
    return config[key]


def one_of(config, key: str, choices, model, note: str = ""):
    """:func:`required`, and one of ``choices`` (else one ``ValueError`` naming the model, the key and
    the choices; ``note`` adds a reason); ``model``: the model (instance, class or name)."""
    name = model if isinstance(model, str) else (model if isinstance(model, type) else type(model)).__name__
    value = required(config, key, name)
    if value not in choices:
        shown = sorted(choices) if isinstance(choices, dict) else choices
        raise ValueError(f"{name}: {key} must be one of {shown}{note}, got {value!r}")
    return value


def _config_model(config):
    try:
        return config["model"]
    except KeyError:
        return None


# the contract of RecBole's own models, which cannot carry our class attributes
_RECBOLE_STAGES = {"S3Rec": ("pretrain", "finetune")}


def model_stages(model_class) -> tuple[str, ...]:
    """The ``train_stage`` values ``model_class`` supports (``STAGES``; RecBole's S3Rec: pretrain /
    finetune; ``()``: no stages, e.g. SASRec)."""
    stages = getattr(model_class, "STAGES", None)
    return tuple(stages if stages is not None else _RECBOLE_STAGES.get(model_class.__name__, ()))


def is_language_model(model_class) -> bool:
    """Whether ``model_class`` is a language-model recommender (``IS_LANGUAGE_MODEL``)."""
    return bool(getattr(model_class, "IS_LANGUAGE_MODEL", False))


def catalogue_buffers(model_class) -> tuple[str, ...]:
    """Names of the buffers of ``model_class`` that describe a catalogue (``CATALOGUE_BUFFERS``)."""
    return tuple(getattr(model_class, "CATALOGUE_BUFFERS", ()))


def epoch_hook(model):
    """The model's ``on_epoch_start`` when it does something (overridden), else ``None``: the
    trainer times it, runs it on rank 0 and broadcasts the buffers only for models that have one."""
    hook = getattr(type(model), "on_epoch_start", None)
    if hook is None or hook is MMSequentialRecommender.on_epoch_start:
        return None
    return model.on_epoch_start


def transfer(model, state_dict: dict, untrained=(), fix_enc: bool | None = None) -> None:
    """Initialise ``model`` (any class) from a pre-training checkpoint's ``state_dict``: ours through
    :meth:`MMSequentialRecommender.load_pretrained` (the weights of ``untrained`` modalities stay
    fresh), RecBole's through the same checked loading (:func:`load_pretrained_state`)."""
    if isinstance(model, MMSequentialRecommender):
        if untrained:
            state_dict = model.keep_fresh(state_dict, untrained)
        model.load_pretrained(state_dict, fix_enc=fix_enc)
    else:
        load_pretrained_state(model, state_dict)


def load_pretrained_state(model: nn.Module, state_dict: dict, wanted=None, who: str | None = None,
                          needs: str = "same model, hidden_size and feature sizes") -> list[str]:
    """Load the weights of a pre-trained ``state_dict`` into ``model`` after checking that they fit:
    every model's ``-p`` (ours through ``load_pretrained``, RecBole's directly) goes through here.

    ``wanted``: the keys the model takes from the checkpoint (default: every key the two share,
    plus the parameters ``model.frozen_on_transfer()`` lists, which must come from the
    checkpoint).  Each must be in the checkpoint with the model's shape, except item-ID tables
    (first dimension the model's ``n_items``), which stay fresh on another catalogue.  Anything
    else is one :class:`CheckpointError` naming what does not fit; so is a checkpoint that
    shares no weight with the model.  Returns the keys loaded."""
    own = model.state_dict()
    who = who or type(model).__name__
    if wanted is None:
        n_items = getattr(model, "n_items", None)
        frozen = set(model.frozen_on_transfer()) if isinstance(model, MMSequentialRecommender) else set()
        wanted = [k for k in own if k in frozen or (k in state_dict and not _catalogue_sized(own[k], state_dict[k], n_items))]
    missing = [k for k in wanted if k not in state_dict]
    shaped = [k for k in wanted if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or shaped or not wanted:
        what = [f"{k} (missing)" for k in missing[:3]] + [
            f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})" for k in shaped[:3]]
        if not wanted:
            raise CheckpointError(f"{who}: the checkpoint shares no weight with the model ({needs} needed)")
        raise CheckpointError(
            f"{who}: the checkpoint does not fit {len(missing) + len(shaped)} of the {len(wanted)} weights to load, "
            f"e.g. {'; '.join(what)} ({needs} needed)"
        )
    model.load_state_dict({k: state_dict[k] for k in wanted}, strict=False)
    fresh = sorted(set(own) - set(wanted))
    skipped = sorted(set(state_dict) - set(wanted))
    getLogger().info(f"{who}: loaded {len(wanted)} pre-trained tensors; fresh: {fresh}; not used: {skipped}")
    return wanted


# feature file key -> (feature size key, modality): a model on features of another size cannot take
# the weights of that modality's side
_FEATURE_SIZES = {"plm_suffix": ("plm_size", "text"), "img_suffix": ("img_size", "image")}


def check_pretrained_checkpoint(ckpt: dict, model_class: type, config, path: str) -> None:
    """What can be checked of a ``-p`` checkpoint before the model is built (one
    :class:`CheckpointError` naming what does not fit): written by this model class (or a class
    it derives from), and, for our feature-based models, on features of the same sizes."""
    written_by = ckpt.get("model")
    lineage = [c.__name__ for c in model_class.__mro__]
    if written_by not in lineage:
        raise CheckpointError(
            f"{path}: a {written_by} checkpoint cannot initialise {model_class.__name__} (-p takes a checkpoint "
            f"of the same model, e.g. from 'recbole-mm pretrain -m {model_class.__name__}')"
        )
    if not issubclass(model_class, MMSequentialRecommender):
        return
    theirs = ckpt.get("config") or {}
    untrained = set(ckpt.get("untrained_modalities") or [])  # e.g. text-only pre-training: image side stays fresh
    for suffix_key, (size_key, modality) in _FEATURE_SIZES.items():
        if modality in untrained:
            continue
        if config[suffix_key] and theirs.get(suffix_key) and theirs.get(size_key) and config[size_key] \
                and int(theirs[size_key]) != int(config[size_key]):
            raise CheckpointError(
                f"{path}: trained on {size_key} {theirs[size_key]} ({theirs[suffix_key]} features), this dataset's "
                f"{config[suffix_key]} features have {size_key} {config[size_key]}: extract them with the same encoder"
            )


def _catalogue_sized(mine: torch.Tensor, theirs: torch.Tensor, n_items) -> bool:
    """An item-ID table of another catalogue: rows = the model's items, same row shape."""
    return (n_items is not None and mine.dim() >= 1 and mine.shape != theirs.shape and mine.shape[0] == n_items
            and theirs.dim() == mine.dim() and theirs.shape[1:] == mine.shape[1:])


class MMSequentialRecommender(SequentialRecommender):
    """A RecBole ``SequentialRecommender`` with shared feature tables and an item-table cache.

    * ``register_features(dataset, names)`` registers the dataset's frozen feature tables as
      non-persistent buffers ``<name>_features`` / ``<name>_presence`` (shared data, not
      weights: checkpoints do not carry them, so a model transfers to another catalogue).
    * ``compute_item_table()`` returns the representation of every item; inside
      ``with model.item_table_cache():`` (what the trainer does around each evaluation) it is
      computed once and reused by every batch.
    * ``gather_negatives`` (config, default True): in distributed training, in-batch
      contrastive losses gather their keys from every rank (``distributed.gather_in_batch``).
    """

    # -- the model contract (see the module docstring) ----------------------------------
    STAGES: tuple[str, ...] = ("pretrain", "inductive_ft", "transductive_ft")
    IS_LANGUAGE_MODEL: bool = False
    CATALOGUE_BUFFERS: tuple[str, ...] = ()

    # weights that only see one modality's features (``{modality: (name prefixes)}``): a
    # checkpoint trained without that modality leaves them fresh (``untrained_modalities``)
    MODALITY_PREFIXES: dict[str, tuple[str, ...]] = {}

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._item_cache: dict = {}
        self._item_cache_on = False
        # distributed: in-batch contrastive negatives from every rank (distributed.gather_in_batch)
        self.gather_negatives = config["gather_negatives"] is not False

    def _init_weights(self, module):
        """SASRec's / BERT's initialisation (``self.initializer_range``), for ``self.apply``."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def register_features(self, dataset, names):
        for name in names:
            if name not in dataset.features:
                raise ValueError(
                    f"{self.__class__.__name__} needs '{name}' features: set "
                    f"{'plm_suffix' if name == 'text' else 'img_suffix'} to a feature file of the dataset"
                )
            self.register_buffer(f"{name}_features", dataset.features[name].clone(), persistent=False)
            self.register_buffer(f"{name}_presence", dataset.feature_presence[name].clone(), persistent=False)

    def untrained_modalities(self) -> list[str]:
        """Registered modalities that no item has (e.g. text-only data): their weights never
        saw a feature.  Saved with checkpoints, so a transfer re-initialises them."""
        return [m for m in ("text", "image") if hasattr(self, f"{m}_presence")
                and not bool(getattr(self, f"{m}_presence")[1:].any())]

    def keep_fresh(self, state_dict: dict, modalities) -> dict:
        """``state_dict`` with this model's own (fresh) weights for the modalities the checkpoint
        never saw (``MODALITY_PREFIXES``), for ``load_pretrained``."""
        prefixes = tuple(p for m in modalities for p in self.MODALITY_PREFIXES.get(m, ()))
        if not prefixes:
            return state_dict
        own = self.state_dict()
        fresh = {k: v for k, v in own.items() if k.startswith(prefixes)}
        getLogger().info(f"pre-trained without {'/'.join(modalities)}: {len(fresh)} tensors "
                         f"({', '.join(p.rstrip('.') for p in prefixes)}) start fresh")
        return {**{k: v for k, v in state_dict.items() if not k.startswith(prefixes)}, **fresh}

    def compute_item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self):
        return self.cached("item_table", self.compute_item_table)

    def cached(self, key: str, compute):
        """``compute()``, memoised under ``key`` inside ``item_table_cache()`` (one evaluation:
        the item table and whatever a model derives from it, e.g. its normalised rows);
        recomputed on every call outside it (training, where the weights change)."""
        if not self._item_cache_on:
            return compute()
        if key not in self._item_cache:
            self._item_cache[key] = compute()
        return self._item_cache[key]

    @contextmanager
    def item_table_cache(self):
        self._item_cache_on, self._item_cache = True, {}
        try:
            yield
        finally:
            self._item_cache_on, self._item_cache = False, {}

    # -- hooks of the contract ------------------------------------------------------------
    def on_epoch_start(self, epoch: int, train_data=None) -> None:
        """Before every training epoch (e.g. MISSRec's interest clustering); nothing by default."""

    def frozen_on_transfer(self) -> list[str]:
        """Parameter names frozen by ``load_pretrained`` under ``fix_enc`` (they must come from the checkpoint)."""
        return []

    def fixes_on_transfer(self) -> bool:
        """``fix_enc`` of ``load_pretrained`` when the caller does not say: the ``fix_enc`` config
        key, when fine-tuning (a pre-training run continued from a checkpoint trains everything)."""
        return bool(getattr(self, "fix_enc", False)) and getattr(self, "train_stage", None) != "pretrain"

    def load_transferable(self, state_dict: dict) -> None:
        """The checked loading of ``load_pretrained`` (:func:`load_pretrained_state`); a model that
        takes only part of a checkpoint overrides it."""
        load_pretrained_state(self, state_dict)

    def load_pretrained(self, state_dict: dict, fix_enc: bool | None = None) -> None:
        """Load transferable weights from a pre-training checkpoint, checked
        (:meth:`load_transferable`: parameters the checkpoint lacks stay fresh unless
        ``frozen_on_transfer`` lists them, then it is an error; ``CATALOGUE_BUFFERS`` are not
        taken), then freeze ``frozen_on_transfer()`` under ``fix_enc`` (default:
        :meth:`fixes_on_transfer`)."""
        if self.CATALOGUE_BUFFERS:  # they belong to the pre-training catalogue: recomputed here
            state_dict = {k: v for k, v in state_dict.items() if k.split(".")[-1] not in self.CATALOGUE_BUFFERS}
        self.load_transferable(state_dict)
        if self.fixes_on_transfer() if fix_enc is None else fix_enc:
            self.freeze(self.frozen_on_transfer())

    def freeze(self, names) -> None:
        """``requires_grad_(False)`` for the named parameters."""
        names = set(names)
        for name, p in self.named_parameters():
            if name in names:
                p.requires_grad_(False)

    # -- serving: scores of a range of items (recbole_mm.recommend's chunked scoring) ----------
    # Together ``score_items(sequence_output(b), item_table_range(s, e), s, e)`` equals
    # ``full_sort_predict(b)[:, s:e]``; a model whose scores are not a dot product of the two
    # overrides ``score_items``; one with a cheaper way to build part of its table overrides
    # ``item_table_range`` (e.g. UniSRec: its adaptor on those items' features only).
    def sequence_output(self, interaction):
        """What ``full_sort_predict`` scores a batch of histories with (default: ``forward``)."""
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def item_table_range(self, start: int, end: int):
        """Rows ``start..end-1`` of the item table that ``score_items`` scores against (default: of
        ``item_table()``, computed once inside ``item_table_cache()``; a dict table: each entry)."""
        table = self.item_table()
        if isinstance(table, dict):
            return {k: v[start:end] for k, v in table.items()}
        return table[start:end]

    def score_items(self, seq_output, items, start: int, end: int) -> torch.Tensor:
        """``[B, end - start]`` scores of ``sequence_output`` against ``item_table_range(start, end)``
        (default: dot product)."""
        return seq_output @ items.T
