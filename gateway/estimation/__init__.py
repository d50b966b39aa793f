"""State estimation in the running gateway: fused vital signs, battery state, machine RUL, with uncertainty.

``[estimators]`` in the config (:mod:`gateway.estimation.config`) says which streams of which
subject feed which estimator; :class:`~gateway.estimation.stage.Estimation` runs them on samples
as they arrive and sends each estimate as an ``estimate`` record (value, standard deviation,
state, the sources that fed it with their shares; ``docs/records.md``).
"""

from gateway.estimation.config import EstimatorsSection
from gateway.estimation.stage import Estimation

__all__ = ["Estimation", "EstimatorsSection"]
