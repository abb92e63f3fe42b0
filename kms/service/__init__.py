"""The KMS service core: the key model, the operations by family over one declared scaffold,
authorization and Recipient release. This face only re-exports.

* :mod:`._model`: callers, outcomes, Recipient facts, keys;
* :mod:`._scaffold`: the pipeline every operation runs through (resolve, authorize, require,
  dry run, answer with plaintext or CiphertextForRecipient) and its declarations;
* :mod:`.lifecycle`, :mod:`.authorization`, :mod:`.management`, :mod:`.crypto`: the operations;
* :mod:`._core`: :class:`KmsService` (state, storage, authorization, the dispatch table).
"""

from __future__ import annotations

from ..integrity import MasterKey as MasterKey
from ._core import OPERATIONS as OPERATIONS
from ._core import KmsService as KmsService
from ._model import Caller as Caller
from ._model import Outcome as Outcome
from ._model import RecipientInfo as RecipientInfo
from ._model import RecipientRejected as RecipientRejected
from ._model import RecipientVerifier as RecipientVerifier
from ._model import SeedKey as SeedKey
from ._scaffold import KeyStep as KeyStep
from ._scaffold import Operation as Operation

__all__ = [
    "Caller",
    "Outcome",
    "RecipientInfo",
    "RecipientVerifier",
    "RecipientRejected",
    "KmsService",
    "SeedKey",
    "MasterKey",
    "OPERATIONS",
    "Operation",
    "KeyStep",
]
