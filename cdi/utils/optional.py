"""Optional dependencies: what needs them and how to install them.

xgboost is optional (``pip install "cdi[xgboost]"``). The default audit
(``--scorer logistic``) and most benchmark methods do not use it; only
``--scorer xgboost`` and the benchmark's GSA1, GSA2 and CLiD_vec (trained
gradient-boosted classifiers, as in their papers) do. The ``xgboost`` wheel
for Linux pulls NVIDIA's NCCL (about 469 MB) even on machines without a GPU;
``xgboost-cpu`` is the same library without it.
"""

from __future__ import annotations

import importlib.util

from cdi.utils.errors import CDIError

#: Benchmark methods whose scorer is an XGBoost classifier.
XGBOOST_METHODS = ("gsa1", "gsa2", "clid_vec")
XGBOOST_INSTALL = ('pip install "cdi[xgboost]" (on a machine without an NVIDIA GPU, pip install xgboost-cpu '
                   'gives the same library without the ~469 MB NCCL download)')


def require_xgboost(what: str) -> None:
    """Raise a ``CDIError`` that says how to install xgboost, unless it is installed."""
    if importlib.util.find_spec("xgboost") is None:
        raise CDIError(f"{what} needs the optional xgboost package, which is not installed: {XGBOOST_INSTALL}")
