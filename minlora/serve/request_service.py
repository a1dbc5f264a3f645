"""RequestService: the parts of the service that the sampling and the training services share."""
from __future__ import annotations

from typing import Callable

from .catalog import Catalog
from .futures import FutureTable
from .model_host import HostedModel
from .state import StateStore

__all__ = ["RequestService"]


class RequestService:
    """Base of SamplingService and TrainingService, which answer clients' requests over one
    hosted model, one catalog of tinker paths, one state store and one future table.

    check_session(owner, session_id) raises a 404 unless the session is the owner's and live.
    """

    def __init__(self, host: HostedModel, catalog: Catalog, store: StateStore, futures: FutureTable,
                 check_session: Callable[[str, str], None]) -> None:
        self.host = host
        self.catalog = catalog
        self.store = store
        self.futures = futures
        self.check_session = check_session
