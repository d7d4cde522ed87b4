"""The audit: from two collections and a model to a verdict and an evidence folder.

``run`` is what ``cdi audit`` runs (``run_audit``); ``from_features`` the audit from stored feature
tables; ``reference`` the base-model reference of fine-tune audits; ``result`` the ``AuditResult``
record (result.json); ``evidence`` the evidence folder written as one unit; ``verify`` re-checks it.
Imports every lower room (utils, stats, data, models, features, engine) and ``cdi.reports``.
"""
