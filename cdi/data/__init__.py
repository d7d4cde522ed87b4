"""Image collections and their checks: the folders P and U before any model sees them.

``collection`` scans a folder into validated image records (``ImageCollection``, re-exported here);
``folder_walk``, ``image_files`` and ``caption_files`` read the files safely; ``duplicates`` finds
exact and near-duplicates; ``preprocess`` and ``image_loader`` turn images into model input;
``descriptors`` and ``shift_guard`` ask, without the model, whether P and U differ.
Imports ``cdi.utils`` and ``cdi.stats`` only.
"""

from cdi.data.collection import ImageCollection

__all__ = ["ImageCollection"]
