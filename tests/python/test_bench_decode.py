"""The decode benchmark runs end to end on its CPU path (tiny float32 shapes, the C reference
kernels): each section's table is printed and its JSON written with positive medians.  A smoke
check, not a measurement: the timings themselves are not looked at."""

import json

import pytest

from llama3_kernels import bench_decode


def test_cpu_run_writes_every_section(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert bench_decode.main(["--cpu", "--out", str(tmp_path), "--reps", "2"]) == 0
    record = json.loads((tmp_path / "bench_decode.json").read_text())
    printed = capsys.readouterr().out

    assert record["timings_are"] == "cpu reference" and record["caveat"] == bench_decode.CPU_NOTE
    assert {"date_utc", "environment", "copy_bandwidth_Bps", "config", "bars"} <= record.keys()
    assert record["environment"]["transformers"] and record["copy_bandwidth_Bps"] > 0

    cases = record["attention_decode"]
    assert [(c["batch"], c["cache"]) for c in cases] == [
        (c["batch"], c["cache"]) for c in bench_decode.CPU_CONFIG["attention"]["cases"]
    ]
    for c in cases:
        assert "llama3_kernels" in c["median_us"] and "SDPA default" in c["median_us"]
        assert all(t > 0 for t in c["median_us"].values())
        assert all(bw > 0 for bw in c["kv_TBps"].values())
        assert c["best_sdpa"] in c["median_us"]
        assert c["max_abs_diff_vs_sdpa_default"] < 1e-4  # the same attention, float32
        assert "SDPA cuDNN" in c["refused"]  # no CPU kernel: reported, not timed

    layer = record["decode_layer"]
    assert layer["weight_bytes"] > 0 and layer["weight_floor_us"] > 0
    assert all(t > 0 for t in layer["median_us"].values()) and len(layer["median_us"]) == 2

    gen = record["generate"]
    assert gen["failed"] == []
    n = gen["new_tokens"]
    contenders = {r["contender"] for r in gen["results"]}
    assert {"HF dynamic", "HF static", "llama3_kernels dynamic", "llama3_kernels static"} <= contenders
    assert len(gen["results"]) == len(contenders) * len(gen["batches"])
    for r in gen["results"]:
        assert r[f"median_ms_{n}_tokens"] > 0 and r["median_ms_1_token"] > 0
    assert gen["transformers_compiles_static_generate"] is False  # generate compiles on accelerators only

    assert record["bars"] and all(b["ok"] is None for b in record["bars"])  # nothing judged on the CPU
    for title in ("Decode attention", "One layer's decode step", "generate(): LlamaForCausalLM"):
        assert title in printed
    assert printed.count(bench_decode.CPU_NOTE) >= 3


def test_sections_and_bad_section(tmp_path):
    assert bench_decode.main(["--cpu", "--out", str(tmp_path), "--reps", "1", "--sections", "layer"]) == 0
    record = json.loads((tmp_path / "bench_decode.json").read_text())
    assert "decode_layer" in record and "attention_decode" not in record and "generate" not in record
    with pytest.raises(SystemExit):
        bench_decode.main(["--cpu", "--out", str(tmp_path), "--sections", "nonsense"])
