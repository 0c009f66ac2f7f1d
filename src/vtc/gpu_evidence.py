"""The GPU evidence in one prepared command: every method's measured cost on the LLaVA-1.5-7B shape, in a time limit.

    python -m vtc.gpu_evidence --out docs/gpu/                  # one CUDA device, ~8 min, writes docs/gpu/evidence-*
    python -m vtc.gpu_evidence --device cpu --shape tiny --out /tmp/ev --caption-tokens 8   # what CI runs

On one device it builds a model of the shape from its config with random weights (`--shape 7b`: the exact
llava-hf/llava-1.5-7b-hf shape, 7.06 B parameters, created in --dtype on the device; nothing is downloaded or
installed), renders --batch-sizes images of the shapes testbed, and for `full` and every registered method at every
budget, under every attention kernel of --kernels that is importable (SDPA; FlashAttention 2 where `flash_attn` is
installed), measures with `vtc.bench`'s timed loops:

    reduce          the method on the encoded visual tokens (on the model's device, see --reduce-device); for ToMe
                    (stage "encoder") its merging vision tower + projector, which replaces the vision tower
                    (`encode_ms` is the plain tower's time, for comparison); in-LLM methods (FastV, DART, SparseVLM)
                    select inside prefill: `selection_ms`, part of prefill
    prefill         time to first token after the reduction: splice + one forward (+ the in-LLM selections)
    decode          ms per decode step of the batch (one new token per row), from the caption runs
    e2e one word    reduce + prefill + 1 decode step: a one-word answer and its end-of-sequence token
    e2e caption     reduce + prefill + (caption_tokens - 1) decode steps (greedy, no early stop at EOS)
    peak memory     torch.cuda.max_memory_allocated during each run (CPU: peak RSS, see `vtc.bench.PeakMemory`)

and beside each measured prefill speed-up over `full` the one `vtc.cost` predicts: the prefill FLOPs ratio, and the
roofline time ratio where the GPU's name matches a preset (H100, A100, H200).

How the methods that need attention weights get them under a fused kernel (SDPA and FlashAttention return none):
CLS attention (cls_attention, visionzip, prumerge, cluster's attention_weighted) is recomputed by
`vtc.models.llava.encode` from the feature layer's q and k, whatever kernel the tower runs; the in-LLM methods
recompute the attention rows they need from those rows' queries and the cached keys (`vtc.models.inllm`), but their
pruning loop builds 4-D masks, which FlashAttention 2 does not take: under it they are listed as skipped; ToMe runs its
own attention through torch's SDPA with its size bias, whatever the model's kernel.

Timing: warm-up runs, `torch.cuda.synchronize` before every clock read, medians (with min / max / quartiles) over
--repeats one-word runs and --caption-repeats caption runs, round-robin over the rows so that drifts hit every method
alike. Measurements run in order of importance (the one-word runs at every batch size and kernel first, then the
caption runs), and before every run the command checks that the run, estimated from the ones before it, ends
before --time-limit (counted from the command's start: torch's import and model building included); if not, it
stops there. The JSON and markdown files are rewritten after every run, so whatever stops it (the limit, an error,
Ctrl-C) leaves what it had measured, marked `complete: false` with the reason.

--reduce-only times just the reductions of the pre-LLM methods on synthetic visual tokens of the shape's widths
(no model: the 7B shape's 576 × 4096 projected tokens on a CPU, for instance), for the cost of `cluster` beside the
others'.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

STARTED = time.monotonic()  # before torch's import (seconds of it): the time limit counts from the command's start

import torch  # noqa: E402

from vtc import bench, cost  # noqa: E402
from vtc.methods import (  # noqa: E402
    VisualTokens,
    available_methods,
    get_method,
    import_plugins,
    method_stage,
    resolved_hparams,
    split_positions,
)
from vtc.models import llava  # noqa: E402
from vtc.pipeline.encode import image_seed  # noqa: E402

SHAPES = ("7b", "tiny")
KERNELS = ("sdpa", "flash_attention_2", "eager")
ONE_WORD_TOKENS = 2  # the answer's one token (from prefill) and the end-of-sequence token (one decode step)
SCHEMA = "vtc.gpu_evidence/1"
# The tiny shape's 4 decoder layers cannot reach the study budgets as layer averages with pruning from layer 2 on, nor
# hold SparseVLM's or PyramidDrop's stages on 32 layers: their settings in configs/shapes-zoo.yaml.
TINY_HPARAMS = {
    "fastv": {"budget_mode": "kept"},
    "dart": {"budget_mode": "kept"},
    "sparsevlm": {"layers": [1, 2, 3], "keep": "fit", "budget_mode": "kept"},
    "pyramiddrop": {"layers": [1, 2, 3], "budget_mode": "kept"},
    "saliency_select": {"budget_mode": "kept"},
}
ATTENTION = {
    "tokens": "CLS attention, where used, recomputed from the vision feature layer's q, k (vtc.models.llava.encode): "
    "the same under every kernel",
    "encoder": "ToMe's own attention with its size bias, through torch's scaled_dot_product_attention, whatever the "
    "model's kernel",
    "llm": "attention rows recomputed from their queries and the cached keys (vtc.models.inllm); the pruning loop "
    "needs 4-D masks: sdpa or eager only",
    "question": "none: a per-question method (CDPruner) needs a relevance model of its own, which vtc.bench does not "
    "time; listed as skipped",
}


class Deadline:
    """Seconds left before the time limit, counted from `start` (the process's start: model building included)."""

    def __init__(self, limit_s: float, start: float | None = None):
        self.limit_s = limit_s
        self.start = time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, estimate_s: float) -> bool:
        """Whether a step estimated to take `estimate_s` seconds ends before the limit (with a 5% margin)."""
        return self.elapsed() + estimate_s < 0.95 * self.limit_s


class Stop(Exception):
    """The time limit (or a deliberate stop) ends the measurements; what was measured is kept."""


@dataclass
class Row:
    """One (kernel, batch size, method, budget) of the evidence: its measured values (ms, MB) and what it predicts."""

    kernel: str
    batch_size: int
    label: str
    method: str
    hparams: dict
    budget: int
    stage: str
    run: bench.Run | None = None
    skipped: str | None = None
    values: dict = field(
        default_factory=lambda: {
            key: []
            for key in (
                "reduce_ms",
                "selection_ms",
                "prefill_ms",
                "decode_ms_per_step",
                "e2e_one_word_ms",
                "e2e_caption_ms",
                "peak_memory_one_word_mb",
                "peak_memory_caption_mb",
            )
        }
    )
    visual_tokens: int | None = None
    per_layer: list[int] | None = None

    def record(self, evidence: Evidence) -> dict:
        full = evidence.full_row(self.kernel, self.batch_size)
        medians = {key: _median(values) for key, values in self.values.items()}
        full_prefill = _median(full.values["prefill_ms"]) if full is not None else None
        speedup = full_prefill / medians["prefill_ms"] if full_prefill and medians["prefill_ms"] else None
        out = {
            "kernel": self.kernel,
            "batch_size": self.batch_size,
            "label": self.label,
            "method": self.method,
            "hparams": self.hparams,
            "budget": self.budget,
            "stage": self.stage,
            "attention_weights": ATTENTION[self.stage],
            "skipped": self.skipped,
            "visual_tokens": self.visual_tokens,
            **{key: bench.summary(values) for key, values in self.values.items()},
            "prefill_speedup_vs_full": speedup,
            "reduce_fraction_of_full_prefill": _ratio(medians["reduce_ms"], full_prefill),
            "selection_fraction_of_full_prefill": _ratio(medians["selection_ms"], full_prefill),
            "predicted": None,
        }
        if self.per_layer is not None:
            out["visual_tokens_per_layer"] = self.per_layer
            predicted = bench.prediction(
                evidence.shape, evidence.text_tokens, self.per_layer, evidence.num_patches,
                evidence.args.caption_tokens, evidence.preset, "pre-LLM" if self.stage != "llm" else "in-LLM",
            )  # fmt: skip
            predicted["prefill_flops_speedup"] = 1 / predicted["prefill_flops_ratio"]
            out["predicted"] = predicted
        return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ----------------------------------------------------------------------------------------------------------------------
# The evidence run


class Evidence:
    """Builds the model, plans the rows and measures them in order of importance until done or out of time."""

    def __init__(self, args, deadline: Deadline):
        self.args, self.deadline = args, deadline
        self.device = llava.resolve_device(args.device)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.rows: list[Row] = []
        self.skipped: list[dict] = []
        self.setups: dict[int, bench.Setup] = {}
        self.pixel_values: dict[int, torch.Tensor] = {}
        self.progress: list[str] = []
        self.stopped: str | None = None
        self.done = False
        self.model = None
        self.shape = self.preset = self.text_tokens = self.num_patches = None
        self.kernels = []
        self.memory = None

    # -- output ------------------------------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        line = f"[{self.deadline.elapsed():6.1f} s] {message}"
        self.progress.append(line)
        print(line, flush=True)

    def full_row(self, kernel: str, batch_size: int) -> Row | None:
        return next((r for r in self.rows if (r.kernel, r.batch_size, r.label) == (kernel, batch_size, "full")), None)

    def result(self) -> dict:
        args = self.args
        model_config = self.model.config if self.model is not None else None
        return {
            "schema": SCHEMA,
            "complete": self.done,
            "stopped": self.stopped,
            "command": " ".join([os.path.basename(sys.executable), "-m", "vtc.gpu_evidence"] + sys.argv[1:]),
            "started_utc": self.started.isoformat(timespec="seconds"),
            "elapsed_s": self.deadline.elapsed(),
            "time_limit_s": self.deadline.limit_s,
            "machine": {**bench.machine(self.device), "flash_attn": _flash_attn_version()},
            "settings": {
                "shape": args.shape,
                "model": (
                    "random init, llava-hf/llava-1.5-7b-hf shape"
                    if args.shape == "7b"
                    else "random init, " "vtc.models.tiny shape"
                ),
                "parameters": sum(p.numel() for p in self.model.parameters()) if self.model is not None else None,
                "device": str(self.device),
                "dtype": args.dtype,
                "kernels": self.kernels,
                "batch_sizes": _ints(args.batch_sizes),
                "budgets": _ints(args.budgets),
                "text_tokens": self.text_tokens,
                "num_patches": self.num_patches,
                "one_word_tokens": ONE_WORD_TOKENS,
                "caption_tokens": args.caption_tokens,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "caption_repeats": args.caption_repeats,
                "reduce_device": str(self.device) if args.reduce_device == "model" else args.reduce_device,
                "seed": args.seed,
                "device_preset": self.preset.name if self.preset else None,
                "peak_memory_kind": self.memory.kind if self.memory else None,
                "model_shape": vars(self.shape) if self.shape else None,
                "vision_attn_implementation": model_config.vision_config._attn_implementation if model_config else None,
                "encode_ms": {str(b): s.encode_ms for b, s in self.setups.items()},
                "timing": bench.TIMING,
            },
            "skipped": self.skipped,
            "records": [row.record(self) for row in self.rows],
            "progress": self.progress,
        }

    def write(self) -> dict:
        result = self.result()
        os.makedirs(self.args.out, exist_ok=True)
        stem = os.path.join(self.args.out, f"evidence-{self.device.type}-{self.args.shape}")
        _write_atomic(stem + ".json", json.dumps(result, indent=1))
        _write_atomic(stem + ".md", markdown(result))
        return result

    # -- plan --------------------------------------------------------------------------------------------------------

    def build(self) -> None:
        args = self.args
        if args.threads:
            torch.set_num_threads(args.threads)
        import_plugins(args.plugins)
        specs = method_specs(args.methods, args.shape)
        budgets, batch_sizes = _ints(args.budgets), _ints(args.batch_sizes)
        self.kernels = []
        for kernel in _names(args.kernels):
            reason = kernel_unavailable(kernel, self.device)
            if reason:
                self.skipped.append({"kernel": kernel, "method": None, "reason": reason})
                self.say(f"kernel {kernel} skipped: {reason}")
            else:
                self.kernels.append(kernel)
        if not self.kernels:
            raise ValueError(f"none of the kernels {args.kernels!r} can run here: {self.skipped}")

        dtype = llava.DTYPES[args.dtype]
        config = model_config(args.shape)
        self.say(f"building a random {args.shape} model ({args.dtype}, {self.device}, {self.kernels[0]})")
        self.model = bench.random_model(config, dtype, self.device, self.kernels[0], args.seed)
        self.shape = cost.ModelShape.from_text_config(self.model.config, bytes_per_param=self.model.dtype.itemsize)
        self.preset = bench.resolve_preset(args.device_preset, self.device)
        self.memory = bench.PeakMemory(self.device)
        self.text_tokens = args.text_tokens  # token_id_prompt: this many text tokens around one image placeholder
        num_layers = self.model.config.text_config.num_hidden_layers
        vision = self.model.config.vision_config
        self.num_patches = (vision.image_size // vision.patch_size) ** 2
        for budget in budgets:
            if not 1 <= budget <= self.num_patches:
                raise ValueError(f"budget {budget} is not between 1 and the {self.num_patches} visual tokens")

        for kernel in self.kernels:
            for batch_size in batch_sizes:
                for label, name, hparams in specs:
                    stage = method_stage(name)
                    for budget in [self.num_patches] if name == "full" else budgets:
                        row = Row(kernel, batch_size, label, name, hparams, budget, stage)
                        try:
                            if stage != "encoder":  # ToMe runs here from the images (`make_run`), not in vtc.bench
                                bench.check_stages([(label, name, hparams)], kernel)
                            row.run = self.make_run(row, num_layers)
                        except ValueError as error:  # a kernel the method cannot run under, a budget it cannot reach
                            row.skipped = str(error)
                        self.rows.append(row)
        for row in self.rows:
            if row.skipped and row.batch_size == batch_sizes[0]:
                self.skipped.append({"kernel": row.kernel, "method": row.label, "budget": row.budget,
                                     "reason": row.skipped})  # fmt: skip

    def make_run(self, row: Row, num_layers: int) -> bench.Run:
        if row.stage == "encoder":  # replaces the vision tower: it runs from the images, not the encoded tokens
            method = get_method(row.method)

            def reduce(_visual, budget, **hparams):
                return method(self.model, self.pixel_values[row.batch_size], budget, **hparams)

            run = bench.Run(row.label, row.method, row.hparams, row.budget, reduce=reduce)
            _check_encoder_budget(self.model, row.budget)
            row.per_layer = [row.budget] * num_layers
            row.visual_tokens = row.budget
            return run
        run = bench.make_run(row.label, row.method, row.hparams, row.budget, num_layers, self.num_patches)
        row.per_layer = run.plan.per_layer if run.plan is not None else [row.budget] * num_layers
        row.visual_tokens = row.per_layer[-1]
        return run

    def setup(self, batch_size: int) -> bench.Setup:
        """The batch's prompt and encoded images (the vision tower timed: `encode_ms`), once per batch size."""
        if batch_size in self.setups:
            return self.setups[batch_size]
        args, model = self.args, self.model
        images, image_ids, _ = bench.sample_batch(batch_size, args.seed)
        config = model.config
        prompt_ids, position = bench.token_id_prompt(config, args.text_tokens, batch_size, args.seed)
        pixel_values = bench.image_processor_for(config)(images, return_tensors="pt")["pixel_values"]
        self.pixel_values[batch_size] = pixel_values.to(model.device, model.dtype)
        times = []
        for i in range(args.warmup + args.repeats):
            start = bench.clock(model.device)
            with torch.no_grad():
                encoded = llava.encode(model, pixel_values)
            if i >= args.warmup:
                times.append((bench.clock(model.device) - start) * 1e3)
        device = model.device if args.reduce_device == "model" else torch.device(args.reduce_device)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        visual = VisualTokens(  # float32, as `vtc.pipeline.reduce` feeds the methods
            projected=encoded.projected.float().to(device),
            features=encoded.features.float().to(device),
            cls_attention=encoded.cls_attention.float().to(device),
            keys=encoded.keys.float().to(device),
            seeds=torch.tensor([image_seed(args.seed, i) for i in image_ids]),
            grid=(grid, grid),
        )
        s = bench.Setup(model, args.shape, prompt_ids.to(model.device), position, prompt_ids.shape[1] - 1,
                        visual, bench.summary(times))  # fmt: skip
        self.setups[batch_size] = s
        self.say(f"batch {batch_size}: encoded (vision tower + projector {s.encode_ms['median']:.3g} ms median)")
        return s

    # -- measure -----------------------------------------------------------------------------------------------------

    def phases(self) -> list[tuple[str, str, int]]:
        """(kind, kernel, batch size) in order of importance: one-word runs everywhere first, then the captions."""
        batch_sizes = _ints(self.args.batch_sizes)
        one_word = [("one_word", k, b) for k in self.kernels for b in batch_sizes]
        caption = [("caption", k, b) for k in self.kernels for b in batch_sizes if self.args.caption_repeats > 0]
        return one_word + caption

    def measure(self) -> None:
        estimates: dict[tuple[str, int], float] = {}  # (kind, batch): the longest run of that kind so far, s
        for kind, kernel, batch_size in self.phases():
            rows = [r for r in self.rows if (r.kernel, r.batch_size) == (kernel, batch_size) and r.run is not None]
            if not rows:
                continue
            if not self.deadline.allows(0):
                raise Stop("time limit reached")
            s = self.setup(batch_size)
            self.model.model.language_model.set_attn_implementation(kernel)
            new_tokens = ONE_WORD_TOKENS if kind == "one_word" else self.args.caption_tokens
            warmup = self.args.warmup if kind == "one_word" else 0  # the one-word runs warmed every kernel
            repeats = self.args.repeats if kind == "one_word" else self.args.caption_repeats
            self.say(f"{kind} runs, {kernel}, batch {batch_size}: {len(rows)} rows × ({warmup} warm-up + {repeats})")
            for repeat in range(-warmup, repeats):
                for row in rows:
                    if row.run is None:  # failed in an earlier round
                        continue
                    estimate = estimates.get((kind, batch_size), self.first_estimate(kind, batch_size))
                    if not self.deadline.allows(estimate):
                        raise Stop(
                            f"time limit: {kind} {kernel} batch {batch_size} {row.label}@{row.budget} "
                            f"(~{estimate:.1f} s) would end after {self.deadline.limit_s:.0f} s"
                        )
                    start = time.monotonic()
                    try:
                        self.memory.start()
                        r = row.run(s, new_tokens)
                        peak, _ = self.memory.stop()
                    except (ValueError, RuntimeError) as error:  # e.g. a budget a method cannot reach on this shape
                        if self.device.type == "cuda" and "out of memory" in str(error):
                            raise
                        row.skipped, row.run = f"{type(error).__name__}: {error}", None
                        self.say(f"  {row.label}@{row.budget} skipped: {row.skipped}")
                        continue
                    took = time.monotonic() - start
                    estimates[kind, batch_size] = max(estimates.get((kind, batch_size), 0.0), took)
                    if repeat >= 0:
                        self.add(row, kind, r, peak, new_tokens)
                        self.write()
                done = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{repeats}"
                self.say(f"  {kind} {kernel} batch {batch_size}: {done} done; {self.summary_line(kernel, batch_size)}")
        self.done = True

    def first_estimate(self, kind: str, batch_size: int) -> float:
        """A caption run before any was measured: the longest one-word run with its one decode step taken
        caption_tokens − 1 times."""
        if kind == "one_word":
            return 0.0
        steps = [v for r in self.rows if r.batch_size == batch_size for v in r.values["decode_ms_per_step"]]
        rows = [r for r in self.rows if r.batch_size == batch_size and r.values["e2e_one_word_ms"]]
        if not rows:
            return 0.0
        one_word = max(max(r.values["e2e_one_word_ms"]) for r in rows) / 1e3
        step = max(steps) / 1e3 if steps else one_word
        return one_word + (self.args.caption_tokens - 1) * step

    def add(self, row: Row, kind: str, r: dict, peak: int, new_tokens: int) -> None:
        v = row.values
        v["prefill_ms"].append(r["prefill"] * 1e3)
        if r["reduce"] is not None:
            v["reduce_ms"].append(r["reduce"] * 1e3)
        if r["selection"] is not None:
            v["selection_ms"].append(r["selection"] * 1e3)
        v["decode_ms_per_step"].append(r["decode"] * 1e3 / (new_tokens - 1))
        v[f"e2e_{kind}_ms"].append(r["e2e"] * 1e3)
        v[f"peak_memory_{kind}_mb"].append(peak / 1e6)
        row.visual_tokens = r["visual_tokens"]

    def summary_line(self, kernel: str, batch_size: int) -> str:
        full = self.full_row(kernel, batch_size)
        cluster = [r for r in self.rows if (r.kernel, r.batch_size, r.method) == (kernel, batch_size, "cluster")]
        parts = []
        if full and full.values["prefill_ms"]:
            parts.append(f"full prefill {_median(full.values['prefill_ms']):.4g} ms")
        for r in cluster:
            if r.values["reduce_ms"]:
                parts.append(f"cluster@{r.budget} reduce {_median(r.values['reduce_ms']):.3g} ms")
        return ", ".join(parts)


def run(args, deadline: Deadline | None = None) -> dict:
    """Measures what `args` asks for, writing the files after every run; returns the result written last."""
    evidence = Evidence(args, deadline or Deadline(args.time_limit))
    try:
        evidence.build()
        evidence.measure()
        evidence.say("done")
    except Stop as stop:
        evidence.stopped = str(stop)
        evidence.say(f"stopped: {stop}")
    except KeyboardInterrupt:
        evidence.stopped = "interrupted"
        evidence.say("interrupted")
    except Exception as error:  # keep what was measured, then fail loudly
        if evidence.model is None:  # bad input, refused before any work: no files, an earlier run's stay
            raise
        evidence.stopped = f"error: {type(error).__name__}: {error}"
        evidence.say(evidence.stopped + "\n" + traceback.format_exc())
        evidence.write()
        raise
    result = evidence.write()
    print(f"wrote {os.path.join(args.out, f'evidence-{evidence.device.type}-{args.shape}')}.json and .md", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# --reduce-only: the reductions alone, on synthetic tokens of the shape's widths


def synthetic_tokens(shape: str, batch_size: int, seed: int) -> VisualTokens:
    """Visual tokens with the widths of `shape`'s vision tower and projector: per image a mixture of 32 Gaussian blobs
    (k-means' early stop and the similarity-based methods depend on the data; random tokens would have no
    structure), CLS attention a softmax of random logits."""
    config = model_config(shape)
    vision, text = config.vision_config, config.text_config
    grid = vision.image_size // vision.patch_size
    n, d, c, heads = grid * grid, text.hidden_size, vision.hidden_size, vision.num_attention_heads
    g = torch.Generator().manual_seed(seed)

    def blobs(width):
        centres = torch.randn(batch_size, 32, width, generator=g)
        which = torch.randint(0, 32, (batch_size, n), generator=g)
        noise = torch.randn(batch_size, n, width, generator=g)
        return centres.gather(1, which[..., None].expand(-1, -1, width)) + 0.5 * noise

    return VisualTokens(
        projected=blobs(d),
        features=blobs(c),
        cls_attention=(3 * torch.randn(batch_size, heads, n, generator=g)).softmax(dim=-1),
        keys=blobs(c),
        seeds=torch.tensor([image_seed(seed, f"synthetic-{b}") for b in range(batch_size)]),
        grid=(grid, grid),
    )


def reduce_only(args, deadline: Deadline | None = None) -> dict:
    """Median time of every pre-LLM method's reduction at every budget and batch size (no model)."""
    deadline = deadline or Deadline(args.time_limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_plugins(args.plugins)
    device = llava.resolve_device(args.device)
    specs = [
        spec
        for spec in method_specs(args.methods, args.shape)
        if method_stage(spec[1]) == "tokens" and spec[1] != "full"
    ]
    records, stopped = [], None
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        for batch_size in _ints(args.batch_sizes):
            visual = synthetic_tokens(args.shape, batch_size, args.seed)
            visual = VisualTokens(**{k: v.to(device) if isinstance(v, torch.Tensor) and k != "seeds" else v
                                     for k, v in vars(visual).items()})  # fmt: skip
            rows = [(label, name, hp, budget) for label, name, hp in specs for budget in _ints(args.budgets)]
            times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
            longest = 0.0
            for repeat in range(-args.warmup, args.repeats):  # round-robin, as vtc.bench
                for i, (label, name, hparams, budget) in enumerate(rows):
                    if not deadline.allows(longest):
                        raise Stop("time limit reached")
                    method = get_method(name)
                    start = bench.clock(device)
                    method(visual, budget, **split_positions(hparams)[1])
                    took = bench.clock(device) - start
                    longest = max(longest, took)
                    if repeat >= 0:
                        times[i].append(took * 1e3)
                print(f"[{deadline.elapsed():6.1f} s] batch {batch_size} round {repeat + 1}", flush=True)
            for i, (label, name, hparams, budget) in enumerate(rows):
                records.append({"batch_size": batch_size, "label": label, "method": name, "budget": budget,
                                "reduce_ms": bench.summary(times[i])})  # fmt: skip
    except Stop as stop:
        stopped = str(stop)
    result = {
        "schema": SCHEMA + "/reduce-only",
        "complete": stopped is None,
        "stopped": stopped,
        "command": " ".join([os.path.basename(sys.executable), "-m", "vtc.gpu_evidence"] + sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "elapsed_s": deadline.elapsed(),
        "machine": {**bench.machine(device), "load_average_at_start": load},
        "settings": {"shape": args.shape, "device": str(device), "dtype": "float32", "warmup": args.warmup,
                     "repeats": args.repeats, "seed": args.seed, "tokens": "synthetic (gpu_evidence.synthetic_tokens)"},
        "records": records,
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"reduce-{device.type}-{args.shape}")
    _write_atomic(stem + ".json", json.dumps(result, indent=1))
    _write_atomic(stem + ".md", reduce_table(result))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def _cell(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits, without exponents: 0.0412, 3.58, 61.7, 54 823."""
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}".replace(",", " ")


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu") or f"{m.get('cpu_model')}, {m.get('torch_threads')} torch threads"
    status = "complete" if result["complete"] else f"PARTIAL ({result['stopped']})"
    lines = [
        f"# vtc GPU evidence: {s['model']}",
        "",
        f"- status: {status}, {result['elapsed_s']:.0f} s of a {result['time_limit_s']:.0f} s limit, "
        f"started {result['started_utc']}",
        f"- device: {where}; {s['device']}, dtype {s['dtype']}, kernels {', '.join(s['kernels']) or '–'}, "
        f"vision tower {s['vision_attn_implementation']}",
        f"- versions: torch {m['torch']} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}, driver {m.get('gpu_driver')}), "
        f"transformers {m['transformers']}, flash_attn {m.get('flash_attn')}, python {m['python']}",
        f"- {s['text_tokens']} text tokens + {s['num_patches']} visual tokens unreduced; one-word answer = "
        f"{s['one_word_tokens']} new tokens, caption = {s['caption_tokens']}; medians of {s['repeats']} one-word runs "
        f"after {s['warmup']} warm-up and {s['caption_repeats']} caption run(s); reductions on "
        f"{s['reduce_device']}; peak memory: {s['peak_memory_kind']}",
        f"- encode (vision tower + projector, in no row's e2e) ms by batch size: "
        + ", ".join(f"{b}: {_ms(e['median'])}" for b, e in s["encode_ms"].items() if e["median"] is not None),
        "- predicted: prefill speed-up from `vtc.cost`'s prefill FLOPs ratio; roofline: its time ratio on "
        f"{s['device_preset'] or 'no preset (none matches this device)'}",
        f"- command: `{result['command']}`",
    ]
    header = [
        "method", "budget", "tokens", "reduce ms", "reduce / full prefill", "prefill ms", "speed-up",
        "predicted (FLOPs)", "predicted (roofline)", "decode ms/step", "e2e one word ms", "e2e caption ms",
        "peak MB",
    ]  # fmt: skip
    groups = {}
    for r in result["records"]:
        groups.setdefault((r["kernel"], r["batch_size"]), []).append(r)
    for (kernel, batch_size), rows in groups.items():
        lines += [
            "",
            f"## {kernel}, batch {batch_size}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in rows:
            if r["skipped"] and not r["prefill_ms"]["n"]:
                lines.append(f"| {r['label']} | {r['budget']} | skipped: {r['skipped'][:160]} |" + " |" * 10)
                continue
            p = r["predicted"] or {}
            reduce = r["reduce_ms"]["median"]
            fraction = r["reduce_fraction_of_full_prefill"]
            if r["stage"] == "llm":  # the selection is part of prefill
                reduce, fraction = r["selection_ms"]["median"], r["selection_fraction_of_full_prefill"]
                reduce_cells = [f"({_ms(reduce)})", f"({_cell(fraction and 100 * fraction, '.1f', '%')})"]
            else:
                reduce_cells = [_ms(reduce), _cell(fraction and 100 * fraction, ".1f", "%")]
            peaks = [x for x in (r["peak_memory_one_word_mb"]["max"], r["peak_memory_caption_mb"]["max"]) if x]
            roofline = p.get("prefill_speedup") if p.get("speedup_basis", "").startswith("roofline") else None
            lines.append(
                "| " + " | ".join([
                    r["label"], str(r["budget"]), str(r["visual_tokens"]), *reduce_cells,
                    _ms(r["prefill_ms"]["median"]), _cell(r["prefill_speedup_vs_full"], ".2f", "×"),
                    _cell(p.get("prefill_flops_speedup"), ".2f", "×"), _cell(roofline, ".2f", "×"),
                    _ms(r["decode_ms_per_step"]["median"]), _ms(r["e2e_one_word_ms"]["median"]),
                    _ms(r["e2e_caption_ms"]["median"]), _cell(max(peaks) if peaks else None, ".0f"),
                ]) + " |"
            )  # fmt: skip
    if result["skipped"]:
        lines += ["", "Skipped:", ""] + [
            f"- {x.get('method') or 'every method'} ({x['kernel']}"
            + (f", budget {x['budget']}" if x.get("budget") else "")
            + f"): {x['reason']}"
            for x in result["skipped"]
        ]
    return "\n".join(lines) + "\n"


def reduce_table(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    budgets = sorted({r["budget"] for r in result["records"]}, reverse=True)
    lines = [
        f"Reduction time (ms, median of {s['repeats']} after {s['warmup']} warm-up) on {s['device']}, "
        f"{m.get('gpu') or m.get('cpu_model')}, {m['torch_threads']} torch threads, torch {m['torch']}; shape "
        f"{s['shape']}, {s['tokens']}; load average at start {m.get('load_average_at_start')}; "
        + ("complete" if result["complete"] else f"PARTIAL ({result['stopped']})"),
        "",
    ]
    for batch_size in sorted({r["batch_size"] for r in result["records"]}):
        lines += [f"| method (batch {batch_size}) | " + " | ".join(str(b) for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]  # fmt: skip
        by_label = {}
        for r in result["records"]:
            if r["batch_size"] == batch_size:
                by_label.setdefault(r["label"], {})[r["budget"]] = r["reduce_ms"]["median"]
        for label, times in by_label.items():
            lines.append(f"| {label} | " + " | ".join(_ms(times.get(b)) for b in budgets) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers and command line


def model_config(shape: str):
    if shape == "7b":
        return bench.llava_15_7b_config()
    from vtc.models import tiny

    return tiny.build_config(tiny.build_tokenizer())


def method_specs(methods: str, shape: str = "7b") -> list[tuple[str, str, dict]]:
    """(label, method, hparams) of `methods` ("all": every registered method), `full` first; hyperparameters checked.
    On the tiny shape an in-LLM method named without hyperparameters gets `TINY_HPARAMS`."""
    names = available_methods() if methods == "all" else _names(methods)
    specs = [bench.parse_method(m) for m in names]
    if shape == "tiny":
        specs = [
            (_label(name, TINY_HPARAMS[name]), name, TINY_HPARAMS[name]) if name in TINY_HPARAMS and not hp
            else (label, name, hp)
            for label, name, hp in specs
        ]  # fmt: skip
    if not any(name == "full" and not hp for _, name, hp in specs):
        specs.insert(0, ("full", "full", {}))
    specs.sort(key=lambda spec: spec[1] != "full")
    for _, name, hparams in specs:
        resolved_hparams(name, hparams)  # unknown method or hyperparameter: fails here, before the model is built
    return specs


def _label(name: str, hparams: dict) -> str:
    return ":".join([name, *(f"{k}={v}" for k, v in hparams.items())])


def kernel_unavailable(kernel: str, device: torch.device) -> str | None:
    """Why an attention kernel cannot run here, or None."""
    if kernel not in KERNELS:
        raise ValueError(f"--kernels: {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "flash_attention_2":
        if device.type != "cuda":
            return "FlashAttention 2 runs on CUDA devices only"
        if _flash_attn_version() is None:
            return "the flash_attn package is not importable (this command installs nothing)"
    return None


def _flash_attn_version() -> str | None:
    try:
        import flash_attn

        return flash_attn.__version__
    except Exception:  # not installed, or built for another torch / CUDA
        return None


def _check_encoder_budget(model, budget: int) -> None:
    """ToMe halves the tokens at most once per layer up to the feature layer: refuse a budget it cannot reach."""
    from vtc.methods.tome import merge_schedule
    from vtc.models.llava import feature_layer_index

    vision = model.config.vision_config
    merge_schedule((vision.image_size // vision.patch_size) ** 2, budget, feature_layer_index(model) + 1)


def _ints(text: str) -> list[int]:
    return [int(x) for x in _names(text)]


def _names(text: str) -> list[str]:
    return [x for x in re.split(r"[,\s]+", text) if x]


def _write_atomic(path: str, text: str) -> None:
    """Readers (and a kill mid-write) see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vtc.gpu_evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu, ... (default cuda)")
    p.add_argument("--shape", default="7b", choices=SHAPES, help="7b: llava-1.5-7b; tiny: the demo model's (tests)")
    p.add_argument("--dtype", default="float16", choices=sorted(llava.DTYPES))
    p.add_argument("--kernels", default="sdpa,flash_attention_2", help=f"comma-separated, of {', '.join(KERNELS)}")
    p.add_argument("--methods", default="all", help="all, or comma-separated METHOD[:HPARAM=VALUE...]")
    p.add_argument("--budgets", default="192,128,64")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--caption-tokens", type=int, default=128, help="new tokens of the caption runs")
    p.add_argument("--text-tokens", type=int, default=cost.TEXT_TOKENS, help="prompt tokens besides the image")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="one-word runs per row")
    p.add_argument("--caption-repeats", type=int, default=1, help="caption runs per row (0: none)")
    p.add_argument("--time-limit", type=float, default=480, help="seconds, from the start (default 480 = 8 min)")
    p.add_argument("--reduce-device", default="model", help="model (the model's device) or cpu (the pipeline's)")
    p.add_argument("--device-preset", default="auto", choices=["auto", "none", *cost.PRESETS])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugins", nargs="*", default=[], help="modules registering extra methods")
    p.add_argument("--reduce-only", action="store_true", help="time the pre-LLM reductions only, on synthetic tokens")
    p.add_argument("--out", default="docs/gpu", help="folder for evidence-<device>-<shape>.json / .md")
    args = p.parse_args(argv)
    if args.caption_tokens < 2:
        p.error("--caption-tokens must be at least 2 (one token from prefill, at least one decode step)")
    if args.repeats < 1 or args.warmup < 0 or args.caption_repeats < 0:
        p.error("--repeats must be at least 1, --warmup and --caption-repeats at least 0")
    return args


def main(argv=None, start: float | None = None) -> dict:
    """`start`: the monotonic clock the time limit counts from (default: now)."""
    start = time.monotonic() if start is None else start
    args = parse_args(argv)
    deadline = Deadline(args.time_limit, start)
    return reduce_only(args, deadline) if args.reduce_only else run(args, deadline)


if __name__ == "__main__":
    main(start=STARTED)
