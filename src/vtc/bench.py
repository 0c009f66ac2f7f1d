"""Measured cost of visual-token reduction on LLaVA-1.5: reduction, prefill, decode, end to end, peak memory.

`vtc.cost` predicts what fewer visual tokens should save; this script measures it. For every method and budget it
runs what the pipeline runs at answer time (`vtc.models.llava`: reduce the cached visual tokens, splice the k kept
vectors into the prompt embeddings, generate greedily) and times each part:

    reduce    the method function on the encoded VisualTokens of one batch (float32, as `vtc.pipeline.reduce`)
    prefill   time to first token: splice + one forward over inputs_embeds with a KV cache + argmax of the last
              position's logits (`logits_to_keep=1`, as HF `generate`)
    decode    new_tokens - 1 greedy steps of one token each through the KV cache (the first generated token
              comes from prefill, as in `vtc.cost.estimate`); reported as tokens/s over the batch
    e2e       reduce + prefill + decode of the same run, per batch and per sample
              (a method with `positions=original` feeds its tokens at their original position ids, computed from its
              sources inside prefill, as `vtc.models.llava.original_positions`; the model's own forward takes them)
    peak mem  GPU: torch.cuda.max_memory_allocated; CPU: the process's peak resident set (VmHWM, reset through
              /proc/self/clear_refs before each run), both also as growth over what was allocated before the run

A method that prunes inside the language model (stage "llm": FastV, DART) runs as the pipeline answers with it: all
N visual tokens are spliced in and `vtc.models.inllm.generate_pruned` selects and drops image tokens between decoder
layers, following `inllm.plan` (budget = layer average, or the count after pruning with hparam budget_mode=kept).
Its selection happens inside prefill, so it has no reduce time before prefill (null in the JSON). One call is split
by forward hooks on the model (`PrefillClock`): prefill ends with the first `lm_head` output, the rest is decode,
and `selection_ms` is the time between the decoder layers where the visual-token count changes (the selection and
the gather; part of prefill, in parentheses in the table's reduce columns). Needs --attn sdpa or eager. Methods of
stage "encoder" (ToMe) replace the vision tower's forward, which this script runs once for all rows: not timed here;
nor are those of stage "question" (CDPruner), which need each question and a relevance model of their own, nor those
that keep a token count of their own per image and ignore the budget (PruMerge's adaptive form, `keeps_own_count`).

The vision tower is identical for every method (it runs before reduction), so it is timed once (`encode_ms`) and
left out of e2e. Next to each measurement stands the prediction of `vtc.cost` for the same shape, text length and
token count: the roofline time ratio for a `--device-preset`, or the prefill FLOPs ratio without one.

Timing follows /work/.library/device/METHOD.md: warm-up runs first, torch.cuda.synchronize() before every clock
read on GPU, medians with min / max / quartiles over --repeats. Repeats run round-robin over all (method, budget)
pairs, so slow drifts of the machine's load hit every method alike.

Usage:
    # CPU, the committed demo model (weights do not change the cost; its shape does)
    python -m vtc.bench --model models/vtc-shapes-tiny --device cpu --dtype float32 \\
        --methods full,random,spatial,pool,cls_attention,cluster --budgets 192,128,64 --out results/bench-cpu.json
    # GPU, a randomly initialised model with the exact llava-hf/llava-1.5-7b-hf shape (no download):
    # ~7.06B parameters = 14.1 GB of fp16 weights on the GPU, + ~0.5 GB of activations and KV cache at batch 1.
    python -m vtc.bench --random-7b --device cuda --dtype float16 --attn sdpa --device-preset H100 \\
        --out results/bench-7b-h100.json
    # the real checkpoint, through its processor and chat template
    python -m vtc.bench --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16 --out results/bench-hf.json
    # cheaper k-means variants, as separate rows: METHOD:HPARAM=VALUE:...
    python -m vtc.bench --random-tiny --methods full,cluster,cluster:iters=3,cluster:init=grid --budgets 64
    # in-LLM methods: budgets are layer averages; budget_mode=kept gives the count after the prune layer instead
    python -m vtc.bench --random-7b --device cuda --dtype float16 --methods full,random,fastv,dart --budgets 128,64
    python -m vtc.bench --random-tiny --methods full,fastv:budget_mode=kept,dart:budget_mode=kept --budgets 64

--random-7b on CPU needs ~14 GB of RAM in bfloat16 (28 GB in float32) and minutes per forward; use a GPU. The
weights are initialised directly in the requested dtype on the requested device (no float32 CPU copy).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from vtc import cost
from vtc.methods import (
    VisualTokens,
    get_method,
    import_plugins,
    keeps_own_count,
    method_stage,
    resolved_hparams,
    split_positions,
)
from vtc.models import inllm, llava
from vtc.pipeline.encode import image_seed

DEFAULT_METHODS = "full,random,spatial,pool,cls_attention,cluster"
DEFAULT_BUDGETS = "192,128,64"
IMAGE_POSITION = 4  # where the placeholder sits in a token-id prompt: after "<s> USER :" as in the llava-hf template
IN_LLM_KERNELS = ("sdpa", "eager")  # generate_pruned builds 4-D masks, which FlashAttention-2 does not take
# How each kind of row is timed, written into its record so the JSON explains its own null reduce times.
TIMING = {
    "tokens": "reduce = the method on the encoded visual tokens; prefill = splice + one forward; "
    "decode = new_tokens - 1 cached one-token steps",
    "llm": "no reduce before prefill (null): the method selects between decoder layers, inside prefill; one "
    "inllm.generate_pruned call, split by forward hooks: prefill = splice of all N + the call up to its first lm_head "
    "output; decode = the rest of the call (new_tokens - 1 steps); selection = time between the layers where the "
    "visual-token count changes, part of prefill; e2e = the call",
}

# ----------------------------------------------------------------------------------------------------------------------
# Models


def llava_15_7b_config():
    """The exact shape of llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + 2-layer GELU projector + Vicuna-7B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )


def random_model(config, dtype: torch.dtype, device: torch.device, attn: str, seed: int):
    """Random weights, created on `device` in `dtype`: for 7B a float32 CPU copy first would need 28 GB."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def image_processor_for(config):
    """A CLIP image processor for a random model (OpenAI CLIP mean / std, resize + centre crop to the tower)."""
    from transformers import CLIPImageProcessor

    size = config.vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@dataclass
class Setup:
    """What stays fixed across methods: the model, one batch of prompts as token ids, and its encoded images."""

    model: torch.nn.Module
    source: str
    prompt_ids: torch.Tensor  # [B, text_tokens + 1] on the model's device, one image placeholder per row
    image_position: int  # index of the placeholder (the same in every row: one prompt, repeated)
    text_tokens: int  # prompt tokens besides the image
    visual: VisualTokens  # on the reduction device, float32
    encode_ms: dict


def sample_batch(batch_size: int, seed: int):
    """`batch_size` distinct images of the shapes testbed and the question of the first: real, cluttered images,
    so data-dependent methods (k-means stopping early) see realistic inputs. Rendered at 96 px; the image
    processor resizes them to the tower's input size."""
    from PIL import Image

    from vtc.data import shapes

    rows, seen = [], set()
    for row in shapes.generate_split(4 * batch_size + 4, seed=seed, split="test"):
        if row["image_id"] not in seen:
            seen.add(row["image_id"])
            rows.append(row)
    if len(rows) < batch_size:
        raise RuntimeError("not enough distinct shapes images")  # generate_split yields ≥ 1 image per 4 rows
    rows = rows[:batch_size]
    images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in rows]
    return images, [r["image_id"] for r in rows], rows[0]["question"]


def token_id_prompt(config, text_tokens: int, batch_size: int, seed: int) -> tuple[torch.Tensor, int]:
    """A fixed-length prompt of random ordinary token ids with one image placeholder; no tokenizer needed."""
    image_token = config.image_token_id
    vocab = config.text_config.vocab_size
    low = 5  # skip the special ids at the start of the vocabulary (<pad>, <unk>, <s>, </s>, ...)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (text_tokens + 1,), generator=g)
    ids[ids == image_token] = low  # the placeholder must occur exactly once
    position = min(IMAGE_POSITION, text_tokens)
    ids[position] = image_token
    return ids.expand(batch_size, -1).clone(), position


def setup(args) -> Setup:
    dtype = llava.DTYPES[args.dtype]
    device = llava.resolve_device(args.device)
    images, image_ids, question = sample_batch(args.batch_size, args.seed)
    if args.model:
        model, processor = llava.load_model(
            args.model, revision=args.revision, dtype=args.dtype, device=str(device), attn_implementation=args.attn
        )
        source = args.model
        # The pipeline's prompt (chat template, tokenised as `splice_visual_tokens` does), one per row.
        prompt = llava.user_turn(processor, question)
        ids = torch.tensor(processor.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        where = (ids == model.config.image_token_id).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"expected exactly one image placeholder in the prompt, found {len(where)}: {prompt!r}")
        prompt_ids, position = ids.expand(args.batch_size, -1).clone(), where[0]
        image_processor = processor.image_processor
    else:
        if args.random_7b:
            config, source = llava_15_7b_config(), "random init, llava-hf/llava-1.5-7b-hf shape"
            image_processor = image_processor_for(config)
        else:
            from vtc.models import tiny

            processor = tiny.build_processor()
            config, source = tiny.build_config(processor.tokenizer), "random init, vtc.models.tiny shape"
            image_processor = processor.image_processor
        model = random_model(config, dtype, device, args.attn, args.seed)
        prompt_ids, position = token_id_prompt(config, args.text_tokens, args.batch_size, args.seed)
    prompt_ids = prompt_ids.to(model.device)

    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    times = []
    for i in range(args.warmup + args.repeats):  # the vision tower: the same for every method, timed once here
        start = clock(model.device)
        encoded = llava.encode(model, pixel_values)
        if i >= args.warmup:
            times.append((clock(model.device) - start) * 1e3)
    reduce_device = model.device if args.reduce_device == "model" else torch.device(args.reduce_device)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    visual = VisualTokens(  # float32 on the reduction device, as `vtc.pipeline.reduce` feeds the methods
        projected=encoded.projected.float().to(reduce_device),
        features=encoded.features.float().to(reduce_device),
        cls_attention=encoded.cls_attention.float().to(reduce_device),
        keys=encoded.keys.float().to(reduce_device),
        seeds=torch.tensor([image_seed(args.seed, i) for i in image_ids]),
        grid=(grid, grid),
    )
    return Setup(model, source, prompt_ids, position, prompt_ids.shape[1] - 1, visual, summary(times))


# ----------------------------------------------------------------------------------------------------------------------
# Timing and memory


def clock(device: torch.device) -> float:
    """Host seconds once all queued device work is done: CUDA kernels run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def summary(values: list[float]) -> dict:
    """Median, min, max and quartiles (inclusive method: defined for a single value too) of one figure."""
    if not values:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0, "values": []}
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "n": len(values),
        "values": values,
    }


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one run. GPU: allocator statistics. CPU: the kernel's resident-set high-water mark, reset
    before the run by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0); where that is not allowed, getrusage's
    ru_maxrss, which never goes down, so only its first rise is attributable to a run.
    tracemalloc is no use here: it sees Python's allocator, not the C++ allocations that hold tensors."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated"
        elif _proc_status_kb("VmHWM") is not None and self._reset_hwm():
            self.kind = "VmHWM (peak RSS, reset via /proc/self/clear_refs)"
        else:
            self.kind = "resource.getrusage ru_maxrss (process lifetime peak RSS)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind.startswith("VmHWM"):
            self._reset_hwm()
            self.before = _proc_status_kb("VmRSS") * 1024
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> tuple[int, int]:
        """(peak bytes, peak bytes above the start of the run)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind.startswith("VmHWM"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, max(peak - self.before, 0)


# ----------------------------------------------------------------------------------------------------------------------
# One run: reduce, prefill, decode


def splice(s: Setup, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds [B, text + k, D] with the k visual vectors in place of the placeholder, and its mask.
    One prompt for the whole batch, so no padding: what `llava.splice_visual_tokens` builds for equal lengths."""
    text = s.model.get_input_embeddings()(s.prompt_ids)
    visual = visual.to(text.device, text.dtype)
    p = s.image_position
    embeds = torch.cat([text[:, :p], visual, text[:, p + 1 :]], dim=1)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


@torch.no_grad()
def greedy(
    model, inputs_embeds, attention_mask, new_tokens: int, times: dict | None = None, position_ids=None
) -> torch.Tensor:
    """[B, new_tokens] greedy tokens: one prefill forward, then new_tokens - 1 cached one-token steps.

    What `model.generate(inputs_embeds=..., do_sample=False)` computes, without its stopping criteria: every run
    does the same amount of work whatever the tokens (an EOS does not end it). `times`, if given, receives the
    host clock after prefill and after decode. position_ids [B, L], if given, are the prompt's (unpadded rows: the
    model's default is 0 … L − 1); each new token continues from the last one + 1."""
    out = model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    token = out.logits[:, -1].argmax(dim=-1)
    tokens = [token]
    if times is not None:
        times["prefill_end"] = clock(inputs_embeds.device)
    past, mask = out.past_key_values, attention_mask
    ones = mask.new_ones(mask.shape[0], 1)
    position = None if position_ids is None else position_ids[:, -1:]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, ones], dim=1)
        position = None if position is None else position + 1
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=past, use_cache=True
        )
        token = out.logits[:, -1].argmax(dim=-1)
        tokens.append(token)
        past = out.past_key_values
    if times is not None:
        times["decode_end"] = clock(inputs_embeds.device)
    return torch.stack(tokens, dim=1)


def greedy_in_llm(model, inputs_embeds, attention_mask, image_mask, plan_, new_tokens: int) -> torch.Tensor:
    """[B, new_tokens] greedy tokens of `inllm.generate_pruned`. It gets no eos_token_id, so an EOS never ends it
    early and every call does the same work whatever the tokens (as `greedy`)."""
    return inllm.generate_pruned(model, inputs_embeds, attention_mask, image_mask, plan_, new_tokens).ids


def original_position_ids(s: Setup, mask: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] of a spliced batch (`splice`) with each visual token at its original position: what
    `llava.original_positions` gives the pipeline's prompts. sources: [B, k, N] bool."""
    image_mask = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    image_mask[:, s.image_position : s.image_position + sources.shape[1]] = True
    offsets = [llava.source_positions(row) for row in sources]
    return llava.original_positions(mask, image_mask, offsets, sources.shape[-1])


@torch.no_grad()
def run_once(s: Setup, method, budget: int, hparams: dict, new_tokens: int) -> dict:
    """One timed pass of a method at a budget; seconds of each part and the number of visual tokens fed. Its
    `positions` hyperparameter places the tokens (inside prefill, like the splice); the method never sees it."""
    device = s.model.device
    positions, own_hparams = split_positions(hparams)
    t = {"start": clock(device)}
    reduced = method(s.visual, budget, **own_hparams)
    t["reduce_end"] = clock(device)  # also waits for the reduction's kernels when it ran on the GPU
    embeds, mask = splice(s, reduced.tokens)
    position_ids = original_position_ids(s, mask, reduced.sources) if positions == "original" else None
    greedy(s.model, embeds, mask, new_tokens, t, position_ids)
    return {
        "reduce": t["reduce_end"] - t["start"],
        "prefill": t["prefill_end"] - t["reduce_end"],
        "decode": t["decode_end"] - t["prefill_end"],
        "e2e": t["decode_end"] - t["start"],
        "selection": None,  # the reduction is all of `reduce`, before prefill
        "visual_tokens": reduced.tokens.shape[1],
    }


def generate_in_llm(s: Setup, plan_, new_tokens: int) -> torch.Tensor:
    """All N visual tokens spliced in, pruned inside the LLM: what `llava.generate_ids_pruned` runs at answer time."""
    embeds, mask = splice(s, s.visual.projected)
    image_mask = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    image_mask[:, s.image_position : s.image_position + s.visual.num_patches] = True
    return greedy_in_llm(s.model, embeds, mask, image_mask, plan_, new_tokens)


class PrefillClock:
    """Clock points inside one `generate_pruned` call, from forward hooks on the model (inllm.py is not touched):

    - around each change of the visual-token count in `per_layer` (after layer l − 1, before layer l): what the loop
      does between those layers, the method's selection and the gather of the kept positions;
    - after the first `lm_head` call, which gives the first new token's logits: the end of prefill.

    The hooks remove themselves at the end of prefill, so decode runs as it would without them."""

    def __init__(self, model, per_layer: list[int]):
        self.device = model.device
        self.marks: dict[tuple[str, int], float] = {}
        self.prefill_end: float | None = None
        layers = model.model.language_model.layers
        self.boundaries = [i for i in range(1, len(per_layer)) if per_layer[i] != per_layer[i - 1]]
        self.handles = [model.lm_head.register_forward_hook(self._end_of_prefill)]
        for i in self.boundaries:
            self.handles.append(layers[i - 1].register_forward_hook(self._mark("before", i)))
            self.handles.append(layers[i].register_forward_pre_hook(self._mark("after", i)))

    def _mark(self, side: str, layer: int):
        def hook(*_):
            self.marks[side, layer] = clock(self.device)

        return hook

    def _end_of_prefill(self, *_):
        self.prefill_end = clock(self.device)
        self.remove()

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def selection(self) -> float | None:
        """Seconds between the layers where the count changes, summed; None when nothing changes (keep = N)."""
        if not self.boundaries:
            return None
        return sum(self.marks["after", i] - self.marks["before", i] for i in self.boundaries)


@torch.no_grad()
def run_once_in_llm(s: Setup, plan_, new_tokens: int) -> dict:
    """One timed pass of an in-LLM method (`TIMING["llm"]`): one generate_pruned call, split at the end of its
    prefill by `PrefillClock`. Its selection is part of prefill, so it has no reduce time before prefill."""
    device = s.model.device
    marks = PrefillClock(s.model, plan_.per_layer)
    try:
        start = clock(device)
        generate_in_llm(s, plan_, new_tokens)
        end = clock(device)
    finally:
        marks.remove()
    if marks.prefill_end is None:
        raise RuntimeError("inllm.generate_pruned no longer calls model.lm_head, which marks the end of its prefill")
    return {
        "reduce": None,
        "selection": marks.selection(),
        "prefill": marks.prefill_end - start,
        "decode": end - marks.prefill_end,
        "e2e": end - start,
        "visual_tokens": plan_.per_layer[-1],
    }


@dataclass
class Run:
    """One (method, budget) row: a method of the encode cache (`reduce`) or an in-LLM method's `inllm.plan`."""

    label: str
    method: str
    hparams: dict
    budget: int
    reduce: Callable | None = None
    plan: inllm.Plan | None = None

    @property
    def stage(self) -> str:
        return "tokens" if self.plan is None else "llm"

    def __call__(self, s: Setup, new_tokens: int) -> dict:
        if self.plan is None:
            return run_once(s, self.reduce, self.budget, self.hparams, new_tokens)
        return run_once_in_llm(s, self.plan, new_tokens)


def check_stages(specs: list[tuple[str, str, dict]], attn: str) -> None:
    """Refuses, before the model loads, what this script cannot time: encoder-stage methods (they replace the vision
    tower's forward, and the benchmark starts from its cached output), question-stage methods, methods that keep a
    count of their own per image (a batch here shares one count), in-LLM methods without a 4-D-mask kernel, and
    hyperparameters a method does not take or a `positions` value that does not exist (`resolved_hparams`)."""
    for label, name, hparams in specs:
        resolved_hparams(name, hparams)
        stage = method_stage(name)
        if stage == "encoder":
            raise ValueError(
                f"method {label!r} ({name}) merges tokens inside the vision tower (stage 'encoder'); vtc.bench starts "
                "from the vision tower's output, shared by every method, so it cannot time it"
            )
        if stage == "question":
            raise ValueError(
                f"method {label!r} ({name}) reduces per question (stage 'question') with a relevance model of its own; "
                "vtc.bench times methods of the cached vision-tower output alone, so it cannot time it"
            )
        if keeps_own_count(name):
            raise ValueError(
                f"method {label!r} ({name}) keeps a token count of its own per image and ignores the budget; vtc.bench "
                "feeds one count to the whole batch at a budget, so it cannot time it"
            )
        if stage == "llm" and attn not in IN_LLM_KERNELS:
            raise ValueError(
                f"method {label!r} ({name}) prunes inside the language model, whose decoder loop builds 4-D masks that "
                f"{attn!r} does not take: use --attn sdpa or eager (models.<name>.attn_implementation in the pipeline)"
            )


def make_run(label: str, name: str, hparams: dict, budget: int, num_layers: int, num_patches: int) -> Run:
    if method_stage(name) == "llm":
        return Run(label, name, hparams, budget, plan=inllm.plan(name, budget, hparams, num_layers, num_patches))
    return Run(label, name, hparams, budget, reduce=get_method(name))


# ----------------------------------------------------------------------------------------------------------------------
# Method specs, machine, predictions


def parse_method(spec: str) -> tuple[str, str, dict]:
    """Parses "cluster:iters=3:init=grid" into (label, "cluster", {"iters": 3, "init": "grid"})."""
    name, *pairs = spec.split(":")
    hparams = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"hyperparameters are KEY=VALUE, got {pair!r} in {spec!r}")
        hparams[key] = _parse_value(value)
    return spec, name, hparams


def _parse_value(value: str):
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def machine(device: torch.device) -> dict:
    import transformers

    info = {
        "cpu_model": None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # other processes competing for the cores skew CPU timings: read it next to the numbers
        "load_average_1_5_15min": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("model name")
        info["cpu_family_model_stepping"] = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
        flags = set(fields.get("flags", "").split())
        # the vector units matmuls use: they explain most CPU timing differences between machines
        info["cpu_vector_flags"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"})
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={props.pci_bus_id}"]
            info["gpu_driver"] = (
                subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or None
            )
        except (OSError, subprocess.SubprocessError, AttributeError):
            info["gpu_driver"] = None
    return info


def resolve_preset(name: str, device: torch.device) -> cost.Device | None:
    if name == "auto":  # the preset named in the GPU's name, none on CPU (the roofline is for HBM GPUs)
        if device.type != "cuda":
            return None
        gpu = torch.cuda.get_device_name(device)
        return next((d for key, d in cost.PRESETS.items() if key in gpu), None)
    return None if name == "none" else cost.PRESETS[name]


def prediction(
    shape: cost.ModelShape, text_tokens: int, per_layer: list[int], full: int, new_tokens: int, device, kind: str
) -> dict:
    """vtc.cost for the visual tokens each decoder layer processes (`per_layer`: [k]·L for a pre-LLM method, the
    plan's per-layer counts for an in-LLM one), relative to `full` at every layer."""
    full_layers = [full] * shape.num_layers
    flops = cost.prefill_flops(shape, text_tokens, per_layer).total
    flops_full = cost.prefill_flops(shape, text_tokens, full_layers).total
    out = {
        "kind": kind,
        "prefill_flops": flops,
        "prefill_flops_ratio": flops / flops_full,
        "kv_cache_bytes": cost.kv_cache_bytes(shape, [text_tokens + n for n in per_layer]),
        "device_preset": device.name if device else None,
    }
    if device is None:  # no roofline: compute-bound CPU, so prefill time should follow FLOPs
        out["prefill_speedup"] = flops_full / flops
        out["speedup_basis"] = "prefill FLOPs ratio"
    else:
        est = cost.estimate(shape, text_tokens, per_layer, new_tokens, device)
        est_full = cost.estimate(shape, text_tokens, full_layers, new_tokens, device)
        out.update(
            prefill_ms=est["prefill_time_s"] * 1e3,
            decode_ms_per_token=est["decode_time_per_token_s"] * 1e3,
            prefill_speedup=est_full["prefill_time_s"] / est["prefill_time_s"],
            speedup_basis=f"roofline prefill time on {device.name}",
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark


def benchmark(args, specs: list[tuple[str, str, dict]] | None = None) -> dict:
    """Runs the benchmark `args` (from `parse_args`) describes. `specs`: (label, method, hparams) of each row, for
    callers whose hyperparameters are not strings (the pipeline's `measure_cost`); default: parsed from args.methods."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import_plugins(args.plugins)
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2: one token from prefill, at least one decode step")
    # (label, method name, hparams); full once at N, first: every speed-up is relative to it
    specs = list(specs) if specs is not None else [parse_method(m) for m in args.methods.split(",") if m]
    if not any(name == "full" and not hp for _, name, hp in specs):
        specs.insert(0, ("full", "full", {}))
    specs.sort(key=lambda spec: spec[1] != "full")
    check_stages(specs, args.attn)
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    s = setup(args)
    device = s.model.device
    num_patches = s.visual.num_patches
    num_layers = s.model.config.text_config.num_hidden_layers

    budgets = [int(b) for b in args.budgets.split(",") if b]
    runs = []
    for label, name, hparams in specs:
        for budget in [num_patches] if name == "full" else budgets:
            if budget > num_patches:
                raise ValueError(f"budget {budget} exceeds the {num_patches} visual tokens of an image")
            runs.append(make_run(label, name, hparams, budget, num_layers, num_patches))
            if name == "full":
                break

    for run in runs:  # warm-up: first calls, allocator growth, kernel selection
        for _ in range(args.warmup):
            run(s, args.new_tokens)
    memory = PeakMemory(device)
    parts = ("reduce", "selection", "prefill", "decode", "e2e")
    measured = [{part: [] for part in (*parts, "peak", "growth")} for _ in runs]
    tokens_fed = [None] * len(runs)
    for _ in range(args.repeats):  # round-robin, see the module docstring
        for i, run in enumerate(runs):
            memory.start()
            r = run(s, args.new_tokens)
            peak, growth = memory.stop()
            m = measured[i]
            for part in parts:
                if r[part] is not None:  # reduce: pre-LLM methods only; selection: in-LLM ones, inside prefill
                    m[part].append(r[part] * 1e3)
            m["peak"].append(peak / 1e6)
            m["growth"].append(growth / 1e6)
            tokens_fed[i] = r["visual_tokens"]

    shape = cost.ModelShape.from_text_config(s.model.config, bytes_per_param=s.model.dtype.itemsize)
    preset = resolve_preset(args.device_preset, device)
    full_prefill = statistics.median(measured[0]["prefill"])
    steps = args.new_tokens - 1
    records = []
    for run, m, k in zip(runs, measured, tokens_fed):
        prefill = statistics.median(m["prefill"])
        reduce_ms = statistics.median(m["reduce"]) if m["reduce"] else None
        selection_ms = statistics.median(m["selection"]) if m["selection"] else None
        decode_rates = [args.batch_size * steps / (ms / 1e3) for ms in m["decode"]]
        per_layer = [k] * shape.num_layers if run.plan is None else run.plan.per_layer
        kind = "pre-LLM" if run.plan is None else "in-LLM"
        records.append(
            {
                "label": run.label,
                "method": run.method,
                "hparams": run.hparams,
                "budget": run.budget,
                "stage": run.stage,
                "timing": TIMING[run.stage],
                "visual_tokens": k,  # in-LLM: after pruning, what the last layers see
                "sequence_length": s.text_tokens + k,
                "visual_tokens_per_layer": per_layer,
                "visual_tokens_layer_avg": cost.layer_average(per_layer),
                "reduce_ms": summary(m["reduce"]),
                "prefill_ms": summary(m["prefill"]),
                "decode_ms": summary(m["decode"]),
                "decode_tokens_per_s": summary(decode_rates),
                "e2e_ms": summary(m["e2e"]),
                "e2e_ms_per_sample": summary([ms / args.batch_size for ms in m["e2e"]]),
                "peak_memory_mb": summary(m["peak"]),
                "peak_memory_growth_mb": summary(m["growth"]),
                "prefill_speedup_vs_full": full_prefill / prefill,
                "reduce_fraction_of_full_prefill": None if reduce_ms is None else reduce_ms / full_prefill,
                "selection_ms": summary(m["selection"]),
                "selection_fraction_of_full_prefill": None if selection_ms is None else selection_ms / full_prefill,
                "predicted": prediction(shape, s.text_tokens, per_layer, num_patches, args.new_tokens, preset, kind),
            }
        )
    settings = {
        "model": s.source,
        "device": str(device),
        "dtype": str(s.model.dtype).removeprefix("torch."),
        "attn_implementation": s.model.config._attn_implementation,
        "reduce_device": str(s.visual.projected.device),
        "batch_size": args.batch_size,
        "text_tokens": s.text_tokens,
        "image_position": s.image_position,
        "num_patches": num_patches,
        "new_tokens": args.new_tokens,
        "decode_steps": steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "device_preset": preset.name if preset else None,
        "peak_memory_kind": memory.kind,
        "encode_ms": s.encode_ms,
        "model_shape": vars(shape),
        "parameters": sum(p.numel() for p in s.model.parameters()),
        "command": " ".join([os.path.basename(sys.executable), "-m", "vtc.bench"] + sys.argv[1:]),
    }
    result = {"machine": machine(device), "settings": settings, "records": records}
    result["machine"]["load_average_at_start"] = load_at_start
    return result


def table(result: dict) -> str:
    """The markdown table of docs/efficiency.md "Measured cost": medians; speed-ups from median prefill times."""
    header = [
        "method", "budget", "tokens", "reduce ms", "reduce / full prefill", "prefill ms", "prefill speed-up",
        "predicted", "decode tok/s", "e2e ms", "peak MB", "peak +MB",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["records"]:
        in_llm, fraction = r["stage"] == "llm", r["reduce_fraction_of_full_prefill"]
        cells = [
            r["label"],
            str(r["budget"]),
            str(r["visual_tokens"]) + (f" (layer avg {r['visual_tokens_layer_avg']:.4g})" if in_llm else ""),
            *(_in_prefill(r) if in_llm else (f"{r['reduce_ms']['median']:.3g}", f"{100 * fraction:.1f}%")),
            f"{r['prefill_ms']['median']:.3g}",
            f"{r['prefill_speedup_vs_full']:.2f}×",
            f"{r['predicted']['prefill_speedup']:.2f}×",
            f"{r['decode_tokens_per_s']['median']:.4g}",
            f"{r['e2e_ms']['median']:.4g}",
            f"{r['peak_memory_mb']['median']:.0f}",
            f"{r['peak_memory_growth_mb']['median']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _in_prefill(record: dict) -> tuple[str, str]:
    """The reduce cells of an in-LLM row: its selection time, in parentheses because prefill includes it."""
    if record["selection_ms"]["median"] is None:  # nothing pruned, so no layer boundary to time
        return "–", "–"
    return f"({record['selection_ms']['median']:.3g})", f"({100 * record['selection_fraction_of_full_prefill']:.1f}%)"


def describe(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['torch_threads']} torch threads"
    return (
        f"{s['model']} on {where}; {s['dtype']}, attn {s['attn_implementation']}, batch {s['batch_size']}, "
        f"{s['text_tokens']} text tokens, {s['new_tokens']} new tokens ({s['decode_steps']} decode steps), "
        f"median of {s['repeats']} after {s['warmup']} warm-up; torch {m['torch']}, transformers {m['transformers']}; "
        f"encode (vision tower + projector, not in e2e) {s['encode_ms']['median']:.3g} ms; "
        f"predicted = {result['records'][0]['predicted']['speedup_basis']}; peak memory: {s['peak_memory_kind']}"
        + (f"; in-LLM rows: {TIMING['llm']}" if any(r["stage"] == "llm" for r in result["records"]) else "")
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vtc.bench", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id or local directory, loaded with vtc.models.llava.load_model")
    src.add_argument("--random-7b", action="store_true", help="random weights, llava-1.5-7b shape (no download)")
    src.add_argument("--random-tiny", action="store_true", help="random weights, the demo model's shape (tests)")
    p.add_argument("--revision", help="hub revision of --model (a commit, branch or tag)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated METHOD[:HPARAM=VALUE...]")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated visual-token budgets")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(llava.DTYPES))
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument(
        "--reduce-device",
        default="cpu",
        help="where the methods run: cpu (what vtc.pipeline.reduce does, on its cache) or model (the model's device)",
    )
    p.add_argument("--device-preset", default="auto", choices=["auto", "none", *cost.PRESETS])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=cost.TEXT_TOKENS, help="prompt length for random models")
    p.add_argument("--new-tokens", type=int, default=cost.NEW_TOKENS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugins", nargs="*", default=[], help="modules registering extra methods")
    p.add_argument("--out", help="JSON file for the full results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = benchmark(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(describe(result) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
