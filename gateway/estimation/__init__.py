"""State estimation in the running gateway: fused vital signs, battery state, machine RUL, with uncertainty.

``[estimators]`` in the config (:mod:`gateway.estimation.config`) says which streams of which
subject feed which estimator; :class:`~gateway.estimation.stage.Estimation` runs them on samples
as they arrive and sends each estimate as an ``estimate`` record (value, standard deviation,
state, the sources that fed it with their shares; ``docs/records.md``).

The names are imported on first use (PEP 562): the config reads ``[estimators]`` with
:mod:`gateway.estimation.config` alone, without the estimators and their models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.lazy import lazy_name

if TYPE_CHECKING:
    from gateway.estimation.config import EstimatorsSection
    from gateway.estimation.stage import Estimation

_HOME = {"Estimation": "stage", "EstimatorsSection": "config"}

__all__ = ["Estimation", "EstimatorsSection"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule when first asked for."""
    return lazy_name(__name__, _HOME, name)
