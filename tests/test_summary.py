"""The summary tables (protocols.summary): the published rows' parameter counts and PPT.

The tables of our own runs are tested in test_protocols.py, next to the records they read.
"""
from __future__ import annotations

import csv
import io
import math

import pytest

from wegeft_vision.data import registry
from wegeft_vision.protocols import RunRecord, published
from wegeft_vision.protocols.summary import fgvc_table, vtab_table

VIT_B_BACKBONE = 85_798_656  # timm vit_base_patch16_224 without its head


def record(benchmark: str, task: str) -> RunRecord:
    return RunRecord(benchmark=benchmark, task=task, method="wegeft", phase="final", seed=0,
                     hparams={}, val_acc=0.5, test_acc=0.8, epochs=100, schedule_epochs=100,
                     trainable_params=24_576,
                     backbone_params=VIT_B_BACKBONE, head_params=1_000, wall_time_s=1.0,
                     peak_memory_mb=1.0, memory_kind="cpu")


@pytest.mark.parametrize("benchmark", ["vtab", "fgvc"])
def test_published_rows_params_and_ppt(benchmark):
    """Published rows turn the paper's percentage into a parameter count of ViT-B/16 and
    compute PPT = acc * exp(-log10(P / 1e7 + 1)) from it, written out here independently."""
    tasks = registry.VTAB_TASKS if benchmark == "vtab" else registry.FGVC_DATASETS
    make = vtab_table if benchmark == "vtab" else fgvc_table
    table = make([record(benchmark, t) for t in tasks], published=True)
    rows = {row["Method"]: row for row in csv.DictReader(io.StringIO(table.to_csv()))}
    checked = 0
    for pub in published.VTAB if benchmark == "vtab" else published.FGVC:
        mean = pub.mean
        row = rows[f"{pub.label} (published)"]
        params = pub.params_percent / 100 * VIT_B_BACKBONE
        assert float(row["Params (M)"]) == pytest.approx(params / 1e6, rel=1e-12)
        assert float(row["Params (%)"]) == pub.params_percent
        assert float(row["PPT"]) == pytest.approx(mean * math.exp(-math.log10(params / 1e7 + 1)),
                                                  rel=1e-12)
        checked += 1
    assert checked == 4
    # WeGeFT: 0.029 % of 85.8M = 24,882 parameters; PPT of 74.09 % barely moves.
    assert rows["WeGeFT (published)"]["Params (M)"].startswith("0.02488")
    markdown = table.to_markdown()
    assert (f"- (published) rows: {published.SOURCE}, ViT-B/16 augreg_in21k; their params are "
            "the published % of ViT-B's backbone and their PPT is computed from those."
            in markdown)
