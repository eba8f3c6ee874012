"""The registry of long-filter kinds: config.filter names one, `make_filter` builds it.

    rtf        models/rtf.py       rational transfer function (the product): FFT kernel, modal decoding
    modal      models/modal.py     poles and residues directly (distilled checkpoints; trainable)
    implicit   models/implicit.py  Hyena's implicit MLP filter (the baseline): no finite state

Every kind implements models/long_filter.LongFilter; nothing else in the model asks which kind it has.
"""

from __future__ import annotations

from typing import Literal

from .implicit import ImplicitFilter
from .long_filter import LongFilter
from .modal import ModalFilter
from .rtf import RTF

# The kinds a config may name (`HyenaRTFConfig.filter`): exactly the registry's keys
# (tests/unit/training/test_train_config.py checks that the two agree).
FilterKind = Literal["rtf", "modal", "implicit"]
FILTERS: dict[FilterKind, type[LongFilter]] = {"rtf": RTF, "modal": ModalFilter, "implicit": ImplicitFilter}


def make_filter(config, layer_idx: int, channels: int, num_filters: int | None) -> LongFilter:
    """The long filter of layer `layer_idx`: `channels` convolved channels served by `num_filters`
    distinct filters (None: one per channel), of the kind config.filter names."""
    return FILTERS[config.filter].from_config(config, layer_idx, channels, num_filters)
