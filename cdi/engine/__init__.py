"""The extraction engine: running the feature families over a collection's batches.

``table`` is the feature table (one row per image); ``store`` the content-addressed, crash-safe
feature cache; ``batching`` the batch-size rule and roofline; ``distributed`` the Ray runner;
``speed`` the throughput measurement. ``cdi.features.extract`` drives these.
Imports ``cdi.utils``, ``cdi.data``, ``cdi.models`` and ``cdi.features``.
"""
