"""The configuration contract of every e2pa network: a JSON-serialisable ``config`` (the constructor
arguments, stored in checkpoints) and ``from_config``, which rebuilds the network from it.

Configurations may come from untrusted checkpoints: ``from_config`` refuses unknown keys before
anything is built (:func:`e2pa.checks.check_config_keys`) and the constructor checks every value.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..checks import check_config_keys

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class Configurable:
    """Mixin for ``nn.Module`` networks whose constructor stores its normalised arguments in
    ``self._config`` (JSON-serialisable: lists, not tuples)."""

    _config: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict (:meth:`from_config` rebuilds)."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """Build from :attr:`config` (e.g. read from a checkpoint). Unknown keys, wrong types and
        out-of-range values are rejected before any module is built; missing keys take the defaults."""
        return cls(**check_config_keys(cls, config))
