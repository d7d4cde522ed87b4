"""Duplicate and near-duplicate images: the hashes that identify them, and the checks between P and U.

Two identities beyond the file's SHA-256 are computed for every image when
its folder is scanned: ``pixel_digest`` (the same for any lossless
re-encoding of the same pixels) and ``perceptual_hash`` (64-bit pHash, close
for re-compressed or resized copies). ``cdi.data.collection`` uses the first two to
drop repeats within one collection; between the published and unpublished
collections, an exact repeat is refused (``check_disjoint``) and a
perceptual near-duplicate is reported for a person to look at
(``near_duplicates``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from PIL import Image

from cdi.utils.errors import CDIError, listing

# The checks below take two cdi.data.collection.ImageCollection objects. That module imports this one (for
# the hashes), so the type is named in the annotations without an import: no import circle, even for checkers.

def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of an RGB image's size and pixel bytes: the same for any lossless re-encoding.

    Two files with this digest decode to the same upright RGB pixels (PNG,
    lossless WebP, TIFF, BMP copies of one image, or a greyscale file and its
    RGB copy), so every model input made from them is identical too, for any
    resolution or crop; it is the "decoded, preprocessed pixels" identity,
    computed once at scan time without knowing the model.
    """
    header = f"{image.width}x{image.height}:".encode()
    return hashlib.sha256(header + image.tobytes()).hexdigest()


def perceptual_hash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash (pHash) of an image, as 16 hex digits.

    pHash (Zauner 2010, the variant of the ``imagehash`` package): the
    greyscale image shrunk to 32x32 with a box filter (area average), its 2-D
    DCT-II, the 8x8 lowest frequencies, one bit per coefficient: 1 where it is
    above their median (the DC term left out of the median). Re-compressed or
    resized copies differ in a few of the 64 bits, unrelated images in about
    half. Measured on the toy world's 32 px digits, the hardest case (simple
    shapes on a plain background): over 807,000 member/non-member pairs, 4
    pairs within 3 bits, none within 1; a JPEG (quality 60) copy within 4
    bits (95%: 2), an 8x upscale within 2.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


# DCT-II basis (unnormalised: the scale does not change which coefficients exceed the median)
_DCT32 = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64)


def check_disjoint(published: ImageCollection, unpublished: ImageCollection) -> None:
    """Raise a ``CDIError`` listing the images in both collections.

    An image is in both when the files are identical (same SHA-256) or when
    they decode to the same pixels (same ``pixel_sha256``: a lossless
    re-encoding such as PNG -> WebP, or a greyscale copy). An unpublished
    image must be one the model cannot have seen; the same image among the
    published ones would make the two sets overlap and bias the test.

    Refusing (rather than dropping the pair from both folders and going on)
    is deliberate: a shared image means the folders were not assembled as
    the user believes, and which side is wrong is theirs to decide; an audit
    that silently tested a different set than the one handed in would be
    harder to defend.
    """
    u_files = {r.sha256: r.path for r in unpublished.records}
    u_pixels = {r.pixel_sha256: r.path for r in unpublished.records if r.pixel_sha256 is not None}
    shared = []
    for r in published.records:
        if r.sha256 in u_files:
            shared.append(f"published {r.path}  =  unpublished {u_files[r.sha256]}")
        elif r.pixel_sha256 in u_pixels:
            shared.append(f"published {r.path}  =  unpublished {u_pixels[r.pixel_sha256]}  (same pixels, "
                          "different file)")
    if shared:
        raise CDIError(
            f"{len(shared)} image(s) are in both the published folder {published.root} and the unpublished "
            f"folder {unpublished.root} (identical files, or files that decode to identical pixels):\n"
            f"{listing(shared)}\n"
            "Unpublished images must be ones the model cannot have seen, so a shared image corrupts the "
            "test. Remove each of these from one of the two folders."
        )


#: Largest pHash Hamming distance (of 64 bits) at which two images count as near-duplicates
#: (see ``perceptual_hash`` for what it catches and how often unrelated images come this close).
NEAR_DUPLICATE_BITS = 3


def near_duplicates(
    published: ImageCollection, unpublished: ImageCollection, *, max_bits: int = NEAR_DUPLICATE_BITS
) -> list[dict[str, Any]]:
    """Pairs (published, unpublished) whose perceptual hashes differ in at most ``max_bits`` bits.

    Perceptual near-duplicates (a re-compressed or resized copy, a light
    retouch) are not refused like exact ones: the hash also matches some
    genuinely different images that are merely alike (plain backgrounds,
    simple graphics), so they are reported for a person to look at. Each pair
    is ``{"published", "unpublished", "distance"}``, sorted by distance then
    paths.
    """
    def bits(collection):
        paths = [r.path for r in collection.records if r.phash is not None]
        values = np.array([int(r.phash, 16) for r in collection.records if r.phash is not None], dtype=np.uint64)
        return paths, values

    p_paths, p_hash = bits(published)
    u_paths, u_hash = bits(unpublished)
    pairs = []
    if not (p_paths and u_paths):
        return pairs
    for i in range(len(p_paths)):
        xor = (u_hash ^ p_hash[i]).view(np.uint8).reshape(-1, 8)
        distance = np.unpackbits(xor, axis=1).sum(axis=1)
        for j in np.flatnonzero(distance <= max_bits):
            pairs.append({"published": p_paths[i], "unpublished": u_paths[j], "distance": int(distance[j])})
    return sorted(pairs, key=lambda d: (d["distance"], d["published"], d["unpublished"]))
