"""--reference-model: target-minus-reference features (cdi.audit.reference), and the fine-tune toy world's statistics.

The calibration tests read ``tests/data/toy_lora_{base,strong}_features.csv``, written by

    python benchmarks/lora_toy.py features --out tests/data

(features ``denoising_loss,pia,multiple_loss,clid`` of the fine-tune toy world's images on the base toy SD
and on base + strong LoRA).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from cdi.utils.errors import CDIError
from cdi.audit.reference import check_reference, difference_table
from cdi.engine.table import FeatureTable

DATA = Path(__file__).parents[1] / "data"
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))


def _table(hashes, values, columns=("a", "b")):
    return FeatureTable(paths=[f"{h}.png" for h in hashes], hashes=list(hashes), captions=[None] * len(hashes),
                        columns=list(columns), values=np.asarray(values, float))


def test_difference_table_matches_rows_by_image_hash():
    target = _table(["x", "y"], [[1.0, 5.0], [2.0, 7.0]])
    reference = _table(["y", "x"], [[0.5, 1.0], [0.25, 2.0]])
    diff = difference_table(target, reference)
    assert diff.columns == ["a_minus_ref", "b_minus_ref"] and diff.hashes == ["x", "y"]
    np.testing.assert_allclose(diff.values, [[0.75, 3.0], [1.5, 6.0]])
    with pytest.raises(CDIError, match="no reference features"):
        difference_table(target, _table(["x"], [[0.0, 0.0]]))
    with pytest.raises(CDIError, match="different columns"):
        difference_table(target, _table(["x", "y"], [[0, 0], [0, 0]], columns=("a", "c")))


def test_reference_must_be_a_comparable_other_model(tiny_adapters):
    with pytest.raises(CDIError, match="same weights"):
        check_reference(tiny_adapters["sd"], tiny_adapters["sd"])
    with pytest.raises(CDIError, match="family"):
        check_reference(tiny_adapters["sd"], tiny_adapters["sdxl"])


def test_audit_of_a_lora_against_its_base(tiny_model_dirs, tmp_path):
    """The CLI end to end on the tiny SD: --lora on --model, --reference-model the base."""
    from cdi.cli.main import app
    from cdi.audit.result import AuditResult

    rng = np.random.default_rng(0)
    for name in ("published", "unpublished"):
        folder = tmp_path / name
        folder.mkdir()
        lines = []
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{name}{i}.png")
            lines.append(json.dumps({"file_name": f"{name}{i}.png", "text": f"a {i}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_"
    lora = {f"{key}{m}.lora_{d}.weight": torch.randn(16, 2, generator=g) if d == "up" else torch.randn(2, 16, generator=g)
            for m in ("q", "out_0") for d in ("up", "down")}
    save_file(lora, str(tmp_path / "style.safetensors"))
    base = str(tiny_model_dirs["sd"])
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, [
        "audit", "--published", str(tmp_path / "published"), "--unpublished", str(tmp_path / "unpublished"),
        "--model", base, "--lora", str(tmp_path / "style.safetensors"), "--lora-scale", "0.5",
        "--reference-model", base, "--out", str(out), "--features", "denoising_loss", "--folds", "2",
        "--permutations", "0", "--sample-size-resamples", "0", "--shift-encoder", "builtin", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = AuditResult.load(out)
    assert saved.question == "used_beyond_reference" and "beyond the reference model" in saved.verdict_text
    assert saved.reference_model["fingerprint"] == saved.model["base_fingerprint"] != saved.model["fingerprint"]
    assert saved.model["loras"][0]["scale"] == 0.5
    assert saved.features["columns"] == ["denoising_loss_minus_ref"]
    assert "--lora" in saved.command and "--reference-model" in saved.command
    header = (out / "features.csv").read_text().splitlines()[0]
    assert header.endswith("denoising_loss_minus_ref,denoising_loss_minus_ref@draw1")  # the 2nd noise draw too
    # cdi verify --model re-loads the base with the recorded LoRA and scale: the fingerprint matches
    verified = CliRunner().invoke(app, ["verify", str(out), "--model", base, "--reference-model", base])
    assert verified.exit_code == 0 and "[PASSED ] reference: fingerprint" in verified.output, verified.output
    empty = CliRunner().invoke(app, ["verify", str(out), "--reference-model", " "])
    assert empty.exit_code == 2 and "--reference-model is empty" in empty.output, empty.output
    other = CliRunner().invoke(app, ["verify", str(out), "--reference-model", str(tiny_model_dirs["sd_v"])])
    assert other.exit_code == 1 and "the reference model differs" in other.output, other.output
    save_file({k: 2 * v for k, v in lora.items()}, str(tmp_path / "style.safetensors"))  # another LoRA, same path
    changed = CliRunner().invoke(app, ["verify", str(out), "--model", base])
    assert changed.exit_code == 1 and "the model differs from the one audited" in changed.output, changed.output
    (tmp_path / "style.safetensors").unlink()
    gone = CliRunner().invoke(app, ["verify", str(out), "--model", base])
    assert gone.exit_code == 1 and "fine-tune parts the audit recorded cannot be loaded" in gone.output, gone.output


# ------------------------------------------------------------ fine-tune toy world, stored features
@pytest.fixture(scope="module")
def lora_tables():
    import lora_toy

    tables = lora_toy.load_tables(DATA)
    assert {"base", "strong"} <= set(tables)
    return tables


@pytest.mark.parametrize("case", ["artist", "base_members"])
def test_reference_calibrated_audit_is_calibrated_on_the_fine_tune_world(lora_tables, case):
    """200 audits, P and U both unused by the LoRA: rejections at 0.05 and 0.01 inside the 99% binomial
    intervals. ``base_members``: P from the base model's own training data, which the calibrated audit must not
    flag (it answers "used beyond the base")."""
    import lora_toy

    from cdi.stats.calibration import null_calibration

    pool_p, pool_u = lora_toy.null_pools(lora_tables)[case]
    if pool_u is None:
        result = null_calibration(pool_p, sizes=((50, 50), (100, 100)), audits=200,
                                  directions=lora_toy.directions(), seed=3)
        assert result.calibrated, result.summary()
        return
    # P and U come from two pools (members, non-members of the base): draw each audit's P from one and U from
    # the other, and check the rejection counts against the same 99% binomial intervals.
    from scipy.stats import binom

    from cdi.stats.verdict import audit_test

    rng = np.random.default_rng(4)
    p_values = []
    for i in range(200):
        n = (50, 100)[i % 2]
        p = pool_p[rng.choice(len(pool_p), n, replace=False)]
        u = pool_u[rng.choice(len(pool_u), n, replace=False)]
        p_values.append(audit_test(p, u, directions=lora_toy.directions(), permutations=0, seed=i).verdict_p)
    p_values = np.array(p_values)
    for alpha in (0.05, 0.01):
        low, high = binom.interval(0.99, 200, alpha)
        assert low <= (p_values < alpha).sum() <= high, (alpha, (p_values < alpha).sum())


def test_difference_table_refuses_tables_of_different_seeds():
    target, reference = _table(["x"], [[1.0, 2.0]]), _table(["x"], [[0.0, 0.0]])
    target.meta["seed"], reference.meta["seed"] = 0, 1
    with pytest.raises(CDIError, match="seed 0 and the reference features with seed 1"):
        difference_table(target, reference)
    reference.meta["seed"] = 0
    assert difference_table(target, reference).values.tolist() == [[1.0, 2.0]]


def test_flux_dev_and_schnell_are_not_each_others_reference(tiny_flow_adapters):
    with pytest.raises(CDIError, match="guidance input.*FLUX.1-dev"):
        check_reference(tiny_flow_adapters["flux_dev"], tiny_flow_adapters["flux_schnell"])


def test_a_reference_audit_keeps_one_model_on_the_gpu_at_a_time():
    """park/unpark move every network of a CUDA adapter (text encoders that offload stay in host memory)."""
    from cdi.audit.reference import park, unpark

    moves = []

    class Net(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def to(self, device):
            moves.append((self.name, str(device)))
            return self

    class Fake:
        def __init__(self, name):
            self.device = torch.device("cuda")
            self.denoiser = self.transformer = Net(f"{name}.transformer")  # one module under two names
            self.text_encoder = Net(f"{name}.t5")
            self.offload_text_encoders = True

        def _text_encoders(self):
            return [self.text_encoder]

    target = Fake("target")
    empty = torch.cuda.empty_cache
    torch.cuda.empty_cache = lambda: None
    try:
        park(target)
        unpark(target)
    finally:
        torch.cuda.empty_cache = empty
    assert moves == [("target.transformer", "cpu"), ("target.t5", "cpu"), ("target.transformer", "cuda")]
