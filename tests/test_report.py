"""The typed report: JSON round trips, and block reports of older resume states still load."""

from __future__ import annotations

from barber.report import REPORT_VERSION, BlockReport, RunReport

OLD_BLOCK = {  # a block report as a state written before row_sparsity and the re-fit existed
    "block": 3,
    "layers": {"mlp.down_proj": {"shape": [4, 8], "kept": 16, "sparsity": 0.5}},
    "subblocks": [{"subblock": "attn", "loss_before": 2.0, "loss_after": 1.5, "swaps": {"q": 1}}],
    "seconds": {"read": 0.1},
    "peak_rss": 123,
}


def test_old_block_reports_load_and_keep_their_fields():
    block = BlockReport.from_json(OLD_BLOCK)
    assert block.layers["mlp.down_proj"].row_sparsity == (0.5, 0.5)
    assert block.swaps == 1 and block.subblocks[0].reconstruct is None
    assert block.to_json() == {**OLD_BLOCK, "layers": {"mlp.down_proj": {**OLD_BLOCK["layers"]["mlp.down_proj"],
                                                                         "row_sparsity": [0.5, 0.5]}}}


def test_run_report_totals_and_round_trip():
    blocks = [BlockReport.from_json(OLD_BLOCK), BlockReport.from_json({**OLD_BLOCK, "block": 4, "peak_rss": 200})]
    report = RunReport("in", "llama", {"sparsity": 0.5}, {"nsamples": 1}, blocks, "0.1.0",
                       seconds={"total": 2.0}, extra={"note": "x"})
    out = report.to_json()
    assert out["report_version"] == REPORT_VERSION and out["note"] == "x"
    assert (out["swaps"], out["peak_rss"], out["sparsity"]) == (2, 200, 0.5)
    assert out["seconds"] == {"read": 0.2, "total": 2.0}
    assert RunReport.from_json(out).to_json() == out
