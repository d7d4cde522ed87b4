"""The statistics: the audit's verdict test and everything it is built from.

``verdict`` holds ``audit_test`` and its ``TestResult`` (re-exported here, so ``cdi.stats.audit_test``
is the public name); ``pooled`` the default pooled statistic; ``scoring``, ``blocks`` and ``logistic``
the block protocols' learned scorer; ``feature_checks`` the validation of feature matrices;
``calibration`` null calibration; ``sample_size`` how many images an audit needs.
Pure numpy/scipy/scikit-learn on feature matrices: imports only ``cdi.utils``.
"""

from cdi.stats.verdict import TestResult, audit_test

__all__ = ["TestResult", "audit_test"]
