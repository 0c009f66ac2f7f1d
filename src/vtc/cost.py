"""Analytic cost model (FLOPs, bytes, roofline time) of the LLaVA-1.5 language model under visual token reduction.

A token-reduction method at budget k is described by how many visual tokens *each decoder layer* processes:

    pre-LLM  (VisionZip, DivPrune, PruMerge, ToMe, random/pool):  [k] * 32
    in-LLM   (FastV K=2):                                          [576, 576] + [k] * 30
    staged   (SparseVLM "192"):  576 for layers 0-2, 300 for 3-6, 200 for 7-15, 110 for 16-31

From that list we count the FLOPs and memory traffic of prefill and decode and turn them into a time with a
roofline model in the spirit of LLM-Viewer (hahnyuan/LLM-Viewer@01b269d:model_analyzer.py, used by the study
arXiv 2504.17892): every operator takes max(FLOPs / peak FLOP/s, bytes / memory bandwidth), and the times add up.
This is a *lower bound* on latency (peak throughput, no launch overheads, no Python); measured GPU timings are the
ground truth, this model explains them and gives numbers when no GPU is at hand.

What is counted (batch size 1, one image, fp16/bf16):
    - every decoder layer: the linear projections (q, k, v, o, gate, up, down) and the two attention matmuls;
    - lm_head for the tokens whose logits are needed (only the last one in prefill, as HF `generate` does);
    - bytes: weights streamed once per forward pass, K/V written and read (FlashAttention-style: the n x n score
      matrix stays on chip), optionally the activations read and written by the linear layers.
What is neglected: RMSNorm, RoPE, softmax, SiLU, residual adds (elementwise, < 1% of FLOPs), the embedding gather,
the CLIP vision tower and the projector (identical for every method that reduces after the projector; see
docs/efficiency.md for their size), the cost of the reduction itself (scoring, clustering, eager attention maps).

Run:
    PYTHONPATH=src python -m vtc.cost        # prints the markdown tables of docs/efficiency.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# ----------------------------------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that the cost model needs."""

    num_layers: int
    hidden_size: int  # d
    intermediate_size: int  # m, MLP width
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    bytes_per_param: int = 2  # fp16 / bf16; also used for activations and the KV cache
    gated_mlp: bool = True  # Llama MLP = down(silu(gate(x)) * up(x)): 3 matrices; False: up/down only
    tie_word_embeddings: bool = False  # Vicuna / LLaVA-1.5 keep a separate lm_head

    def __post_init__(self):
        if self.head_dim is None:  # frozen dataclass: derived defaults need object.__setattr__
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of every matrix in one decoder layer."""
        d, m = self.hidden_size, self.intermediate_size
        mats = [
            ("q_proj", d, self.q_dim),
            ("k_proj", d, self.kv_dim),
            ("v_proj", d, self.kv_dim),
            ("o_proj", self.q_dim, d),
        ]
        if self.gated_mlp:
            mats += [("gate_proj", d, m), ("up_proj", d, m), ("down_proj", m, d)]
        else:
            mats += [("up_proj", d, m), ("down_proj", m, d)]
        return mats

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear layers of one decoder layer (= multiply-accumulates per token)."""
        return sum(i * o for _, i, o in self.linear_shapes())

    @classmethod
    def from_text_config(cls, cfg, bytes_per_param: int = 2) -> "ModelShape":
        """Read a transformers LlamaConfig-like object (a LlavaConfig is unwrapped to its text_config)."""
        cfg = getattr(cfg, "text_config", None) or cfg
        num_heads = cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,  # None in old configs means MHA
            vocab_size=cfg.vocab_size,
            head_dim=getattr(cfg, "head_dim", None),
            bytes_per_param=bytes_per_param,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


# Vicuna-7B / 13B v1.5 as used by llava-hf/llava-1.5-{7b,13b}-hf (vocab 32064 = 32000 + image/pad tokens, padded).
LLAVA_15_7B = ModelShape(
    num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, vocab_size=32064
)
LLAVA_15_13B = ModelShape(
    num_layers=40, hidden_size=5120, intermediate_size=13824, num_heads=40, num_kv_heads=40, vocab_size=32064
)
# The vision tower, to size the constant part of a request: CLIP ViT-L/14-336 runs all 24 layers on 577 tokens
# (LLaVA reads hidden_states[-2] but HF still runs the last layer); GELU MLP (2 matrices), no lm_head.
CLIP_VIT_L14_336 = ModelShape(
    num_layers=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    num_kv_heads=16,
    vocab_size=0,
    gated_mlp=False,
)


# ----------------------------------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense (no 2:4 sparsity) FLOP/s for the dtype the model runs in
    memory_bandwidth: float  # bytes/s of HBM


# NVIDIA datasheets list tensor-core throughput "with sparsity"; the dense figure is half of it.
# H100 SXM: BF16 1,979 TFLOPS with sparsity -> 989 dense; HBM3 3.35 TB/s
#   (https://www.nvidia.com/en-us/data-center/h100/, "NVIDIA H100 Tensor Core GPU" datasheet).
# A100 80GB SXM: BF16 312 TFLOPS dense (624 with sparsity); HBM2e 2,039 GB/s
#   (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf).
# H200 SXM: BF16 1,979 TFLOPS with sparsity -> 989 dense; HBM3e 4.8 TB/s
#   (https://www.nvidia.com/en-us/data-center/h200/).
H100_SXM = Device("H100 SXM", peak_flops=989e12, memory_bandwidth=3.35e12)
A100_80GB_SXM = Device("A100 80GB SXM", peak_flops=312e12, memory_bandwidth=2.039e12)
H200 = Device("H200 SXM", peak_flops=989e12, memory_bandwidth=4.8e12)
# The names the pipeline config (`efficiency.device_preset`) and `python -m vtc.bench --device-preset` accept.
PRESETS = {"H100": H100_SXM, "A100": A100_80GB_SXM, "H200": H200}


# ----------------------------------------------------------------------------------------------------------------------
# Tokens per layer


def staged_tokens_per_layer(num_layers: int, full: int, stages: dict[int, int]) -> list[int]:
    """Visual tokens per layer for a method that prunes at several layers.

    `stages` maps a 0-based layer index to the count kept from that layer on; layers before the first stage see
    `full`. SparseVLM "192" prunes the outputs of layers 2, 6, 15, so its layers process
    staged_tokens_per_layer(32, 576, {3: 300, 7: 200, 16: 110}).
    """
    tokens, current = [], full
    for layer in range(num_layers):
        current = stages.get(layer, current)
        tokens.append(current)
    return tokens


def visual_tokens_per_layer_for(
    kind: str, k: int, num_layers: int, full: int = 576, prune_layer: int | None = None
) -> list[int]:
    """Visual tokens seen by each decoder layer.

    kind="pre-LLM": k at every layer (the reduction happens before the LLM).
    kind="in-LLM":  `full` for layers 0 .. prune_layer-1, then k (FastV K=2: prune_layer=2).
    """
    kind = kind.lower().replace("_", "-")
    if kind == "pre-llm":
        return [k] * num_layers
    if kind == "in-llm":
        if prune_layer is None or not 0 <= prune_layer <= num_layers:
            raise ValueError(f"in-LLM reduction needs 0 <= prune_layer <= {num_layers}, got {prune_layer}")
        return staged_tokens_per_layer(num_layers, full, {prune_layer: k})
    raise ValueError(f"kind must be 'pre-LLM' or 'in-LLM', got {kind!r}")


def layer_average(tokens_per_layer: Sequence[float]) -> float:
    """The 'average token count over decoder layers' that in-LLM papers report as their budget."""
    return sum(tokens_per_layer) / len(tokens_per_layer)


def kept_for_layer_average(target_average: float, num_layers: int, prune_layer: int, full: int = 576) -> float:
    """Tokens to keep after `prune_layer` so the layer average is `target_average`:
    (K·full + (L − K)·x) / L = target  →  x = (L·target − K·full) / (L − K), K = prune_layer, L = num_layers.
    FastV K=2 on 32 layers: 192 → 166.4, 128 → 98.1, 64 → 29.9 (round to an integer)."""
    return (num_layers * target_average - prune_layer * full) / (num_layers - prune_layer)


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and bytes


@dataclass(frozen=True)
class FlopBreakdown:
    linear: int
    attention: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head


def _check_layers(shape: ModelShape, tokens_per_layer: Sequence[int], what: str):
    if len(tokens_per_layer) != shape.num_layers:
        raise ValueError(f"{what} has {len(tokens_per_layer)} entries, the model has {shape.num_layers} layers")


def _attention_flops(shape: ModelShape, queries: int, keys: int) -> int:
    # QKᵀ (queries × keys × head_dim MACs per head) plus AV (same again), 2 FLOPs per MAC.
    return 2 * 2 * queries * keys * shape.head_dim * shape.num_heads


def prefill_flops(shape: ModelShape, text_tokens: int, visual_tokens_per_layer: Sequence[int]) -> FlopBreakdown:
    """FLOPs of the prefill forward pass (one sequence), 2 FLOPs per multiply-accumulate.

    With n_l = text_tokens + visual_tokens_per_layer[l], d = hidden, m = MLP width, d_q = heads·head_dim,
    d_kv = kv_heads·head_dim:

        linear_l    = 2·n_l·(d·d_q + 2·d·d_kv + d_q·d) + 2·n_l·3·d·m      (q, k, v, o; gate, up, down)
        attention_l = 2·2·n_l²·head_dim·heads                            (QKᵀ and AV)
        lm_head     = 2·d·vocab                                          (logits of the last token only)

    Attention counts the full n² score matrix, not the causal half: this is the convention of LLM-Viewer and of
    the FLOPs formulas of FastV / DivPrune / SparseVLM (4nd² + 2n²d + 2ndm or 3ndm *MACs* per layer), and what
    eager / SDPA-math kernels compute before masking. A causal FlashAttention kernel skips about half of it;
    attention is ~2.5% of prefill FLOPs at n = 640 on LLaVA-1.5-7B, so the choice barely moves the totals.
    """
    _check_layers(shape, visual_tokens_per_layer, "visual_tokens_per_layer")
    linear = attention = 0
    for v in visual_tokens_per_layer:
        n = text_tokens + v
        linear += 2 * n * shape.layer_linear_params
        attention += _attention_flops(shape, n, n)
    return FlopBreakdown(linear=linear, attention=attention, lm_head=2 * shape.hidden_size * shape.vocab_size)


def decode_flops(shape: ModelShape, context_tokens_per_layer: Sequence[int], new_tokens: int) -> FlopBreakdown:
    """FLOPs of `new_tokens` decode steps, each feeding one token through the model with a KV cache.

    c_l = context_tokens_per_layer[l] is what layer l has cached when decoding starts (text + kept visual tokens).
    Step i = 0 .. N−1 appends its own K/V first, so its query attends over c_l + i + 1 keys:

        linear    = N · Σ_l 2·(d·d_q + 2·d·d_kv + d_q·d + 3·d·m)
        attention = Σ_l 2·2·head_dim·heads · Σ_i (c_l + i + 1) = Σ_l 4·head_dim·heads·(N·c_l + N(N+1)/2)
        lm_head   = N · 2·d·vocab
    """
    _check_layers(shape, context_tokens_per_layer, "context_tokens_per_layer")
    n = new_tokens
    keys = sum(n * c + n * (n + 1) // 2 for c in context_tokens_per_layer)
    return FlopBreakdown(
        linear=n * shape.num_layers * 2 * shape.layer_linear_params,
        attention=_attention_flops(shape, 1, keys),
        lm_head=n * 2 * shape.hidden_size * shape.vocab_size,
    )


def kv_cache_bytes(shape: ModelShape, tokens_per_layer: Sequence[int], bytes_per_elem: int | None = None) -> int:
    """Σ_l 2 (K and V) · n_l · kv_heads · head_dim · bytes.

    LLaVA-1.5-7B with 576 tokens at every layer: 32·2·576·4096·2 B = 302 MB."""
    _check_layers(shape, tokens_per_layer, "tokens_per_layer")
    b = shape.bytes_per_param if bytes_per_elem is None else bytes_per_elem
    return sum(2 * n * shape.kv_dim * b for n in tokens_per_layer)


def param_count(shape: ModelShape, include_embedding: bool = True) -> int:
    """Parameters of the language model: decoder layers (+2 RMSNorm weights each), final norm, lm_head, embeddings."""
    d = shape.hidden_size
    params = shape.num_layers * (shape.layer_linear_params + 2 * d) + d + shape.vocab_size * d  # lm_head
    if include_embedding and not shape.tie_word_embeddings:
        params += shape.vocab_size * d
    return params


def weight_bytes(shape: ModelShape, include_embedding: bool = True) -> int:
    """Bytes of the language-model weights (LLaVA-1.5-7B: 6.74e9 params · 2 B = 13.5 GB)."""
    return param_count(shape, include_embedding) * shape.bytes_per_param


# ----------------------------------------------------------------------------------------------------------------------
# Roofline


def roofline_time(flops: float, bytes_moved: float, device: Device) -> float:
    """Seconds for one operator: it is limited by compute or by memory, whichever is slower."""
    return max(flops / device.peak_flops, bytes_moved / device.memory_bandwidth)


def _forward_ops(
    shape: ModelShape, queries: Sequence[int], keys_per_layer: Sequence[int], logits: int, activations: bool
) -> list[tuple[int, int]]:
    """(flops, bytes) of each operator of one forward pass that feeds queries[l] tokens to layer l.

    Per layer, two operators:
      linear:    2·q·P FLOPs; bytes = P weights + K/V written (2·q·d_kv)  [+ q·Σ(in+out) activations]
      attention: 2·2·q·keys·head_dim·heads FLOPs; bytes = K/V read (2·keys·d_kv)  [+ Q read, O written]
    plus lm_head over `logits` tokens. With activations off, the seven matrices of a layer have (almost, k/v also
    write the cache) the same arithmetic intensity of q FLOPs/byte, so one operator per layer gives the time of
    LLM-Viewer's per-matrix sum unless the layer sits right at the device's ridge point.
    The embedding table is not streamed (a gather of q rows), so it is left out of the bytes.
    """
    b, d = shape.bytes_per_param, shape.hidden_size
    ops = []
    for q, keys in zip(queries, keys_per_layer):
        kv_write = 2 * q * shape.kv_dim * b
        linear_bytes = shape.layer_linear_params * b + kv_write
        attention_bytes = 2 * keys * shape.kv_dim * b
        if activations:
            # every matrix reads its input and writes its output; k/v outputs are the KV write counted above
            linear_bytes += q * (sum(i + o for _, i, o in shape.linear_shapes()) - 2 * shape.kv_dim) * b
            attention_bytes += 2 * q * shape.q_dim * b
        ops.append((2 * q * shape.layer_linear_params, linear_bytes))
        ops.append((_attention_flops(shape, q, keys), attention_bytes))
    lm_bytes = shape.vocab_size * d * b + (logits * (d + shape.vocab_size) * b if activations else 0)
    ops.append((2 * logits * d * shape.vocab_size, lm_bytes))
    return ops


def _run(ops, device: Device) -> dict:
    return {
        "flops": sum(f for f, _ in ops),
        "bytes": sum(m for _, m in ops),
        "time_s": sum(roofline_time(f, m, device) for f, m in ops),
    }


def prefill_estimate(
    shape: ModelShape,
    text_tokens: int,
    visual_tokens_per_layer: Sequence[int],
    device: Device,
    include_activations: bool = False,
) -> dict:
    """Prefill FLOPs, bytes moved (weights + K/V written and read, optionally activations) and roofline seconds."""
    _check_layers(shape, visual_tokens_per_layer, "visual_tokens_per_layer")
    n = [text_tokens + v for v in visual_tokens_per_layer]
    return _run(_forward_ops(shape, n, n, logits=1, activations=include_activations), device)


def decode_estimate(
    shape: ModelShape,
    context_tokens_per_layer: Sequence[int],
    new_tokens: int,
    device: Device,
    include_activations: bool = False,
) -> dict:
    """`new_tokens` decode steps. Per step: bytes = weights (without the embedding table) + the whole KV cache read
    + one token's K/V written; FLOPs as in `decode_flops`. At batch size 1 every step is memory-bound."""
    _check_layers(shape, context_tokens_per_layer, "context_tokens_per_layer")
    ops = []
    for i in range(new_tokens):
        keys = [c + i + 1 for c in context_tokens_per_layer]
        ops += _forward_ops(shape, [1] * shape.num_layers, keys, logits=1, activations=include_activations)
    out = _run(ops, device)
    out["time_per_token_s"] = out["time_s"] / new_tokens if new_tokens else 0.0
    return out


def estimate(
    shape: ModelShape,
    text_tokens: int,
    visual_tokens_per_layer: Sequence[int],
    new_tokens: int,
    device: Device,
    include_activations: bool = False,
) -> dict:
    """All figures for one request: a prompt of `text_tokens` + the image, then `new_tokens` generated.

    As in HF `generate`, the prefill already yields the first new token, so there are new_tokens − 1 decode steps.
    """
    _check_layers(shape, visual_tokens_per_layer, "visual_tokens_per_layer")
    context = [text_tokens + v for v in visual_tokens_per_layer]
    flops = prefill_flops(shape, text_tokens, visual_tokens_per_layer)
    pre = prefill_estimate(shape, text_tokens, visual_tokens_per_layer, device, include_activations)
    steps = max(new_tokens - 1, 0)
    dec = decode_estimate(shape, context, steps, device, include_activations)
    return {
        "device": device.name,
        "visual_tokens_layer_avg": layer_average(visual_tokens_per_layer),
        "prefill_flops": flops.total,
        "prefill_flops_linear": flops.linear,
        "prefill_flops_attention": flops.attention,
        "prefill_flops_lm_head": flops.lm_head,
        "prefill_bytes": pre["bytes"],
        "prefill_time_s": pre["time_s"],
        "decode_steps": steps,
        "decode_flops": dec["flops"],
        "decode_bytes": dec["bytes"],
        "decode_time_s": dec["time_s"],
        "decode_time_per_token_s": dec["time_per_token_s"],
        "kv_cache_bytes": kv_cache_bytes(shape, context),  # after prefill
        "weight_bytes": weight_bytes(shape),
        "total_time_s": pre["time_s"] + dec["time_s"],
    }


RATIO_KEYS = (
    "prefill_flops",
    "prefill_time_s",
    "decode_flops",
    "decode_time_per_token_s",
    "kv_cache_bytes",
    "total_time_s",
)


def relative_to_full(
    shape: ModelShape,
    text_tokens: int,
    visual_tokens_per_layer: Sequence[int],
    new_tokens: int,
    device: Device,
    full: int = 576,
    include_activations: bool = False,
) -> dict:
    """Ratios (reduced / full) of the main figures against the same request with `full` visual tokens at every layer."""
    reduced = estimate(shape, text_tokens, visual_tokens_per_layer, new_tokens, device, include_activations)
    base = estimate(shape, text_tokens, [full] * shape.num_layers, new_tokens, device, include_activations)
    return {key: reduced[key] / base[key] if base[key] else float("nan") for key in RATIO_KEYS}


# ----------------------------------------------------------------------------------------------------------------------
# python -m vtc.cost: the tables of docs/efficiency.md

TEXT_TOKENS = 64  # system prompt (35 tokens before the image in vicuna_v1) + a short question + "ASSISTANT:"
NEW_TOKENS = 16  # a short answer (VQA-style); 15 decode steps after prefill


def table(
    rows: list[tuple[str, list[int]]],
    shape: ModelShape = LLAVA_15_7B,
    text_tokens: int = TEXT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    devices: Sequence[Device] = (H100_SXM, A100_80GB_SXM),
) -> str:
    """Markdown table, one row per (label, visual tokens per layer)."""
    full = estimate(shape, text_tokens, [576] * shape.num_layers, new_tokens, devices[0])
    names = [dev.name.split()[0] for dev in devices]
    header = (
        ["method", "visual tokens (layer avg)", "prefill TFLOPs", "vs 576", "KV cache MB"]
        + [f"prefill ms {n}" for n in names]
        + [f"decode ms/token {n}" for n in names]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, tokens in rows:
        per_device = [estimate(shape, text_tokens, tokens, new_tokens, dev) for dev in devices]
        e = per_device[0]
        cells = [
            label,
            f"{layer_average(tokens):.1f}",
            f"{e['prefill_flops'] / 1e12:.2f}",
            f"{e['prefill_flops'] / full['prefill_flops']:.3f}",
            f"{e['kv_cache_bytes'] / 1e6:.0f}",
        ]
        cells += [f"{x['prefill_time_s'] * 1e3:.2f}" for x in per_device]
        cells += [f"{x['decode_time_per_token_s'] * 1e3:.2f}" for x in per_device]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    L = LLAVA_15_7B.num_layers
    pre = [(f"pre-LLM k={k}", visual_tokens_per_layer_for("pre-LLM", k, L)) for k in (576, 192, 128, 64)]
    fastv = []
    for avg in (192, 128, 64):
        kept = round(kept_for_layer_average(avg, L, prune_layer=2))
        fastv.append((f"FastV K=2 keep {kept}", visual_tokens_per_layer_for("in-LLM", kept, L, prune_layer=2)))
    # SparseVLM prunes the *output* of layers 2, 6 and 15 (pruning_loc): those layers still run on the previous
    # count, so the reduced counts are processed from layers 3, 7 and 16 on. Recycled cluster tokens are ignored.
    sparsevlm = [
        (f"SparseVLM v1 '{label}' {stages}", staged_tokens_per_layer(L, 576, dict(zip((3, 7, 16), stages))))
        for label, stages in (("192", (300, 200, 110)), ("128", (303, 110, 36)), ("64", (66, 30, 17)))
    ]
    print(
        f"LLaVA-1.5-7B, {TEXT_TOKENS} text tokens, {NEW_TOKENS} generated tokens, batch 1, fp16; "
        f"weights {weight_bytes(LLAVA_15_7B) / 1e9:.2f} GB ({param_count(LLAVA_15_7B) / 1e9:.3f}B params)\n"
    )
    print(table(pre + fastv + sparsevlm))
    # the constant part that no LLM-side reduction touches: vision tower + 2-layer MLP projector (1024→4096→4096)
    vit = [prefill_estimate(CLIP_VIT_L14_336, 577, [0] * 24, dev) for dev in (H100_SXM, A100_80GB_SXM)]
    projector = 2 * 576 * (1024 * 4096 + 4096 * 4096)
    print(
        f"\nNot in the table (same for every row): CLIP ViT-L/14-336 on 577 tokens {vit[0]['flops'] / 1e12:.3f} TFLOPs "
        f"({vit[0]['time_s'] * 1e3:.2f} ms H100, {vit[1]['time_s'] * 1e3:.2f} ms A100), "
        f"projector {projector / 1e12:.3f} TFLOPs."
    )


if __name__ == "__main__":
    main()
