"""Every registry a config may name a component from, by kind: what the composition root hands the loader."""

from __future__ import annotations

from .criteria import CATALOGUE as CRITERIA
from .methods import CATALOGUE as METHODS
from .models import CATALOGUE as MODELS
from .registry import Catalogue
from .tasks import CATALOGUE as DATASETS
from .training import OPTIMIZER_CATALOGUE, SCHEDULER_CATALOGUE

__all__ = ["CATALOGUES"]

#: Keyed as fedevents.engine.vocabulary.KINDS.
CATALOGUES: dict[str, Catalogue] = {
    "methods": METHODS,
    "models": MODELS,
    "datasets": DATASETS,
    "criteria": CRITERIA,
    "optimizers": OPTIMIZER_CATALOGUE,
    "schedulers": SCHEDULER_CATALOGUE,
}
