"""The GPU evidence command (`vtc.gpu_evidence`) in its CPU mode on the tiny shape: what CI can run of it."""

import json

import pytest
import torch

from vtc import gpu_evidence
from vtc.methods import available_methods, keeps_own_count

TINY = ["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--text-tokens", "8", "--threads", "1"]
MEASURED = ("prefill_ms", "decode_ms_per_step", "e2e_one_word_ms", "e2e_caption_ms")
PEAKS = ("peak_memory_one_word_mb", "peak_memory_caption_mb")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # --threads sets the process-wide count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    threads = torch.get_num_threads()
    argv = TINY + ["--out", str(out), "--batch-sizes", "1,2", "--caption-tokens", "3", "--repeats", "1"]
    returned = gpu_evidence.main(argv + ["--warmup", "0"])
    torch.set_num_threads(threads)
    saved = json.loads((out / "evidence-cpu-tiny.json").read_text())
    return returned, saved, (out / "evidence-cpu-tiny.md").read_text()


def test_writes_what_it_returns_with_device_dtype_kernel_and_versions(evidence):
    returned, saved, _ = evidence
    assert saved == json.loads(json.dumps(returned))
    assert saved["schema"] == gpu_evidence.SCHEMA and saved["complete"] and saved["stopped"] is None
    assert 0 < saved["elapsed_s"] < saved["time_limit_s"] == 480
    machine, settings = saved["machine"], saved["settings"]
    for key in ("cpu_model", "torch", "transformers", "python", "torch_threads"):
        assert machine[key], key
    assert "flash_attn" in machine
    assert (settings["device"], settings["dtype"], settings["kernels"]) == ("cpu", "float32", ["sdpa"])
    assert settings["batch_sizes"] == [1, 2] and settings["num_patches"] == 576 and settings["text_tokens"] == 8
    assert settings["one_word_tokens"] == 2 and settings["caption_tokens"] == 3
    assert {b: e["median"] > 0 for b, e in settings["encode_ms"].items()} == {"1": True, "2": True}
    # FlashAttention 2 needs CUDA: skipped, with the reason, not silently dropped
    assert {"kernel": "flash_attention_2", "method": None, "reason": "FlashAttention 2 runs on CUDA devices only"} in (
        saved["skipped"]
    )
    assert any(line.endswith("done") for line in saved["progress"])


def test_every_method_and_budget_is_measured_or_says_why_not(evidence):
    _, saved, _ = evidence
    records = saved["records"]
    expected = {("full", 576)} | {(m, b) for m in available_methods() if m != "full" for b in (192, 128, 64)}
    for batch_size in (1, 2):
        rows = [r for r in records if r["batch_size"] == batch_size]
        assert {(r["method"], r["budget"]) for r in rows} == expected and len(rows) == len(expected)
    for r in records:
        if (r["method"], r["budget"]) == ("tome", 64):  # 3 merging layers halve 576 to 72 at the fewest
            assert "ToMe cannot reach budget = 64" in r["skipped"] and r["prefill_ms"]["n"] == 0
            continue
        if r["stage"] == "question":  # CDPruner: a relevance model per question, which vtc.bench does not time
            assert "reduces per question" in r["skipped"] and r["prefill_ms"]["n"] == 0
            continue
        if keeps_own_count(r["method"]):  # adaptive PruMerge: a count per image, where vtc.bench feeds one per batch
            assert "keeps a token count of its own per image" in r["skipped"] and r["prefill_ms"]["n"] == 0
            continue
        assert r["skipped"] is None, r["label"]
        for figure in MEASURED + PEAKS:
            assert r[figure]["median"] > 0, (r["label"], figure)
        assert r["prefill_ms"]["n"] == 2  # one one-word and one caption run
        assert r["e2e_one_word_ms"]["n"] == r["e2e_caption_ms"]["n"] == 1
        if r["stage"] == "llm":  # selects inside prefill: no reduce time before it, its selection timed
            assert r["reduce_ms"]["n"] == 0 and 0 < r["selection_ms"]["median"] < r["prefill_ms"]["max"]
            assert r["visual_tokens"] == r["budget"]  # budget_mode kept on the tiny shape
            assert r["hparams"]["budget_mode"] == "kept"
        else:
            assert r["reduce_ms"]["median"] > 0 and r["selection_ms"]["n"] == 0
            assert r["visual_tokens"] == r["budget"]
        assert r["attention_weights"] == gpu_evidence.ATTENTION[r["stage"]]


def test_speed_ups_stand_beside_the_cost_model(evidence):
    _, saved, _ = evidence
    for r in saved["records"]:
        if r["skipped"]:
            continue
        predicted = r["predicted"]
        assert predicted["prefill_flops_speedup"] == pytest.approx(1 / predicted["prefill_flops_ratio"])
        assert r["prefill_speedup_vs_full"] > 0
        if r["method"] == "full":
            assert r["prefill_speedup_vs_full"] == 1 and predicted["prefill_flops_speedup"] == 1
            assert r["visual_tokens_per_layer"] == [576] * 4
        elif r["stage"] != "llm":
            assert predicted["prefill_flops_speedup"] > 1 and r["visual_tokens_per_layer"] == [r["budget"]] * 4
        else:  # layers 0, 1 (FastV, DART: pruned from layer 2 on) or 0 (SparseVLM's first stage) see all 576
            assert r["visual_tokens_per_layer"][0] == 576 and r["visual_tokens_per_layer"][-1] == r["budget"]


def test_markdown_has_a_table_per_kernel_and_batch_size_and_a_row_per_record(evidence):
    _, saved, text = evidence
    assert "status: complete" in text and "dtype float32, kernels sdpa" in text
    assert "## sdpa, batch 1" in text and "## sdpa, batch 2" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(saved["records"])
    assert any(line.startswith("| tome | 64 | skipped: ") for line in rows)


class CountingDeadline(gpu_evidence.Deadline):
    """Allows `runs` checks, then refuses: a time limit that falls at a known point."""

    def __init__(self, runs: int):
        super().__init__(limit_s=1e9)
        self.runs = runs

    def allows(self, estimate_s: float) -> bool:
        self.runs -= 1
        return self.runs >= 0


def test_stops_at_the_time_limit_with_what_it_measured(tmp_path):
    args = gpu_evidence.parse_args(
        TINY + ["--out", str(tmp_path), "--methods", "random,cluster", "--budgets", "64", "--batch-sizes", "1,2"]
        + ["--warmup", "0", "--repeats", "2", "--caption-tokens", "3"]
    )  # fmt: skip
    # 4 checks allowed: the phase's start and the 3 rows of repeat 1; the first row of repeat 2 is refused
    returned = gpu_evidence.run(args, CountingDeadline(runs=4))
    saved = json.loads((tmp_path / "evidence-cpu-tiny.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    assert not saved["complete"] and saved["stopped"].startswith("time limit: one_word sdpa batch 1 full@576")
    batch_1 = [r for r in saved["records"] if r["batch_size"] == 1]
    batch_2 = [r for r in saved["records"] if r["batch_size"] == 2]
    assert [(r["label"], r["budget"]) for r in batch_1] == [("full", 576), ("random", 64), ("cluster", 64)]
    assert all(r["prefill_ms"]["n"] == 1 and r["prefill_ms"]["median"] > 0 for r in batch_1)
    assert all(r["prefill_ms"]["n"] == 0 and r["prefill_ms"]["median"] is None for r in batch_2)
    assert "PARTIAL (time limit" in (tmp_path / "evidence-cpu-tiny.md").read_text()


def test_a_real_time_limit_stops_it_before_measuring(tmp_path):
    returned = gpu_evidence.main(TINY + ["--out", str(tmp_path), "--methods", "random", "--time-limit", "0.01"])
    assert not returned["complete"] and returned["stopped"] == "time limit reached"
    assert returned["records"] and all(r["prefill_ms"]["n"] == 0 for r in returned["records"])
    assert json.loads((tmp_path / "evidence-cpu-tiny.json").read_text())["stopped"] == "time limit reached"


def test_reduce_only_times_the_pre_llm_methods_on_synthetic_tokens(tmp_path):
    argv = TINY + ["--reduce-only", "--out", str(tmp_path), "--methods", "random,cluster,tome,fastv", "--budgets"]
    result = gpu_evidence.main(argv + ["64,32", "--batch-sizes", "2", "--repeats", "2"])
    assert result["complete"]
    assert [(r["method"], r["budget"]) for r in result["records"]] == [
        ("random", 64), ("random", 32), ("cluster", 64), ("cluster", 32),
    ]  # fmt: skip
    assert all(r["reduce_ms"]["n"] == 2 and r["reduce_ms"]["median"] > 0 for r in result["records"])
    tokens = gpu_evidence.synthetic_tokens("7b", 1, seed=0)
    assert tokens.projected.shape == (1, 576, 4096) and tokens.features.shape == (1, 576, 1024)
    assert tokens.cls_attention.shape == (1, 16, 576) and tokens.grid == (24, 24)
    assert "| cluster | 64 | 32 |" not in (tmp_path / "reduce-cpu-tiny.md").read_text()  # budgets are columns
    assert "| method (batch 2) | 64 | 32 |" in (tmp_path / "reduce-cpu-tiny.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "full,nonexistent"], "unknown method 'nonexistent'"),
        (["--methods", "cluster:iterations=3"], "has no hyperparameter 'iterations'"),
        (["--kernels", "flash"], "--kernels: 'flash' is not one of"),
    ],
)
def test_bad_input_is_refused_before_the_model_is_built(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(gpu_evidence.bench, "random_model", lambda *a: pytest.fail("the model must not be built"))
    with pytest.raises((KeyError, ValueError), match=message):
        gpu_evidence.main(TINY + ["--out", str(tmp_path), *extra])
    assert not list(tmp_path.iterdir())  # an earlier run's files would stay as they were
