"""`make bench-gpu` still runs: its CPU smoke grid (tiny preset) through every section, each with
numbers, no section failed, and the JSON written (the GPU run itself is in the README)."""

from __future__ import annotations

import json

from funchat.benchmarks import gpu


def test_the_gpu_benchmark_runs_on_cpu_with_the_tiny_preset(tmp_path, capsys):
    out = tmp_path / "bench-gpu.json"
    report = gpu.main(["--device", "cpu", "--json", str(out)])
    assert "errors" not in report, report.get("errors")
    saved = json.loads(out.read_text())
    assert saved["plan"]["preset"] == "tiny"
    assert set(saved) >= {"llm_step", "srh_step", "drsr", "vocoder", "first_audio", "first_audio_later_turn",
                          "capacity", "profile"}
    assert all(cell["engine"]["median_ms"] > 0 for cell in saved["llm_step"].values())
    assert all(cell["median_ms"] > 0 for cell in saved["srh_step"].values())
    assert saved["vocoder"]["mel_snr_db"]["bfloat16_vs_float32"] > 20
    assert saved["first_audio"]["median_ms"] > 0 and saved["first_audio_later_turn"]["median_ms"] > 0
    for variant in ("whole", "kept"):
        assert [lv["calls"] for lv in saved["capacity"][variant]["levels"]][0] == 2
    assert sum(lv["kept_turns"] for lv in saved["capacity"]["kept"]["levels"]) > 0
    assert sum(lv["kept_turns"] for lv in saved["capacity"]["whole"]["levels"]) == 0
    assert "largest number of real-time calls" in capsys.readouterr().out
