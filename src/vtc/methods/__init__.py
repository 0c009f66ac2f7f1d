"""Visual-token reduction methods, registered by name.

A method is a pure function, in one file of this package (or of a user's module), decorated with
`@register_method("name")`:

    def method(tokens: VisualTokens, budget: int, **hparams) -> Reduced

It sees the whole batch of cached encoder outputs and returns, per image, the `budget` vectors the
language model will see, in the order it will see them, and which input patches each came from.
Hyperparameters come from `config.yaml` (`methods: {name: {hparam: value}}`) as keyword arguments, except
`positions`, which every method has and the pipeline consumes (`split_positions`): the position ids the LLM gives
the tokens, "renumbered" (k consecutive ids where the image was) or "original" (each token's source patches' ids in
the unreduced sequence, `vtc.models.llava.original_positions`).

A method that changes the vision encoder itself (ToMe merges inside every encoder layer) cannot work from the
shared encode cache. It registers with `stage="encoder"` and runs the model's vision tower and projector itself:

    @register_method("name", stage="encoder")
    def method(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor, budget: int, **hparams) -> Reduced

A method that prunes inside the language model (FastV, DART) registers with `stage="llm"`. It is a pure selection
function that the pruning decoder loop (`vtc.models.inllm`) calls once per batch at its prune layer K (a keyword
hyperparameter `layer` with a default) with what the model computed up to there:

    @register_method("name", stage="llm")
    def method(state: LayerState, keep: int, *, layer: int = 2, **hparams) -> torch.Tensor  # [B, keep]

It returns, per row, the indices (into the row's N image tokens, ascending) of the image tokens that layers K …
process; its `reduce` job is the identity (all N tokens) and the pruning happens when the answers are generated.

A method that prunes at several layers (SparseVLM) also registers a `schedule`, which turns the budget and its
hyperparameters into `Stage`s (layer K, image tokens kept, tokens added); the loop calls the selection function at
each stage's layer with that stage's `keep`, and a stage that adds tokens returns a `Selection` (the kept indices
into the image tokens the stage saw, the added hidden states and which of those image tokens each aggregates):

    @register_method("name", stage="llm", schedule=schedule_fn, positions="renumbered")
    def method(state: LayerState, keep: int, *, layer: int, **hparams) -> Selection
    def schedule_fn(budget: int, budget_mode: str, num_layers: int, num_patches: int, **hparams) -> list[Stage]

A method that needs the question as well as the image (CDPruner's relevance to the instruction) registers with
`stage="question"`: the same signature as a "tokens" method, but each row of the batch is one (image, question) pair,
with the question's text in `VisualTokens.questions` and the model's config entry in `VisualTokens.model`; its reduce
job writes one reduced sequence per question, keyed by the question's id (`vtc.pipeline.reduce.reduce_questions`).

Hyperparameters are declared by the function's keyword defaults (their types: an `int` default takes integers, a
`float` one numbers, a `str` one strings, a `bool` one booleans, a list or tuple one lists; an annotation such as
`int | None` widens that), and, for choices and ranges, by `hparams=` on the decorator:

    @register_method("name", hparams={"iters": Hparam(min=1), "init": Hparam(choices=("kmeans++", "grid"))})

so that a config's values are checked before any job runs (`resolved_hparams` raises `HparamError`).

`method_stage(name)` tells the pipeline which kind a method is: a "tokens" method reduces the encode cache, an
"encoder" method gets its own reduce job that loads the model and the images (`vtc.pipeline.reduce`), an "llm"
method keeps every token in `reduce` and prunes inside the language model at answer time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch


@dataclass(frozen=True)
class VisualTokens:
    """Encoder outputs of a batch of B images with N = H × W patches (row-major), as cached by `encode`.

    projected:      [B, N, D] visual tokens after the projector, what the LLM would see without reduction.
    features:       [B, N, C] vision-tower features of the feature layer that `projected` comes from.
    cls_attention:  [B, heads, N] attention of the CLS query to each patch in the feature layer.
    keys:           [B, N, C] attention keys of the feature layer (heads concatenated).
    seeds:          [B] int64, one seed per image (derived from the run seed and the image id), so
                    that stochastic methods give the same result whatever the batch composition.
    grid:           (H, W) patch grid.
    questions:      for a method of stage "question" only: B strings, row b's question (the dataset's `question`
                    column, without the benchmark's answer-format instruction); None otherwise.
    model:          for a method of stage "question" only: the `models.<name>` config entry (path, revision, family) of the
                    model the tokens come from, for a method that uses its tokenizer or embeddings; None otherwise.
    """

    projected: torch.Tensor
    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    seeds: torch.Tensor
    grid: tuple[int, int]
    questions: tuple[str, ...] | None = None
    model: dict | None = None

    @property
    def num_patches(self) -> int:
        return self.projected.shape[1]


@dataclass(frozen=True)
class Reduced:
    """What the LLM sees for a batch: k vectors per image.

    tokens:   [B, k, D] in the order they are fed to the LLM.
    sources:  [B, k, N] bool, sources[b, i, j] is True when output token i covers input patch j.
    lengths:  [B] int64, only for a method that keeps its own count per image (PruMerge's adaptive selection): row b's
              first lengths[b] tokens are its output, the rest padding (zero tokens, no sources); k = max(lengths).
    """

    tokens: torch.Tensor
    sources: torch.Tensor
    lengths: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.shape[:2] != self.sources.shape[:2]:
            raise ValueError(
                f"tokens {tuple(self.tokens.shape)} and sources {tuple(self.sources.shape)} disagree on [B, k]"
            )


class Method(Protocol):
    def __call__(self, tokens: VisualTokens, budget: int, **hparams) -> Reduced: ...


@dataclass(frozen=True)
class LayerState:
    """What an in-LLM method (stage="llm") sees at its prune layer K, for a batch of B left-padded rows of L positions
    whose image tokens are N per row (at a later stage of a multi-stage method: the M image tokens, one contiguous
    block per row, that the previous stage kept or added, and L the sequence those layers processed).

    hidden:          [B, L, D] output of layer K − 1 (the input of layer K), before the final norm.
    normed:          [B, L, D] the same through the language model's final RMSNorm (DART's `last_layer_state`).
    keys:            [B, H_kv, L, d] keys of layer K − 1 after RoPE, as the KV cache holds them.
    last_attention:  [B, L] attention weights of each row's last prompt token at layer K − 1, averaged over heads
                     (softmax(q·kᵀ·scaling) over the row's valid positions; recomputed from the query of that one
                     token and the cached keys, so the model keeps its fused attention kernel).
    image:           [B, N] int64 positions of each row's image tokens, ascending.
    text:            [B, L] bool, valid positions that are not image tokens.
    valid:           [B, L] bool, the attention mask (False on left padding).
    attention:       rows [B, L] bool → [B, L]: the head-averaged attention weights at layer K − 1 of the query
                     positions `rows` (causal, valid keys only), averaged over those queries; recomputed like
                     `last_attention` from those queries and the cached keys.
    prompt:          [B, L0, D] the spliced prompt as layer 0 received it, before any pruning.
    prompt_image:    [B, N] positions of its image tokens. Text is never pruned, so the text after the image is the
                     same tokens at the end of `prompt` and of the current sequence (left padding).
    layer_attention: rows [B, L] bool → [B, L]: as `attention`, but of layer K itself, the first layer that will
                     process the kept tokens: its input norm, query and key projections applied to `hidden`, with the
                     rotary embedding of the current positions, before layer K runs (PyramidDrop's ranking).
    """

    hidden: torch.Tensor
    normed: torch.Tensor
    keys: torch.Tensor
    last_attention: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    valid: torch.Tensor
    attention: Callable[[torch.Tensor], torch.Tensor] | None = None
    prompt: torch.Tensor | None = None
    prompt_image: torch.Tensor | None = None
    layer_attention: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Stage:
    """One pruning point of an in-LLM method: layers `layer` … (up to the next stage) process `keep` of the image
    tokens the previous layers processed, followed by `merged` tokens the method adds (SparseVLM's recycled tokens)."""

    layer: int
    keep: int
    merged: int = 0

    @property
    def tokens(self) -> int:
        return self.keep + self.merged


@dataclass(frozen=True)
class Selection:
    """What an in-LLM method returns at a stage that adds tokens, for the M image tokens that stage saw.

    kept:     [B, keep] indices into the M image tokens, ascending.
    merged:   [B, r, D] hidden states of the added tokens, which follow the kept image tokens in the sequence.
    members:  [B, r, M] bool, the image tokens each added token aggregates.
    """

    kept: torch.Tensor
    merged: torch.Tensor
    members: torch.Tensor


# Position ids of the visual tokens the LLM sees: "original" keeps each token's id in the unreduced sequence (gapped
# where tokens were dropped), "renumbered" gives the k tokens k consecutive ids.
POSITIONS = ("original", "renumbered")
# Where a method that reduces before the LLM leaves `positions` unset: what LLaVA-style reduction papers feed (a model
# family may have its own default, `PROVIDES["positions"]` of `vtc.models.<family>`).
PRE_LLM_POSITIONS = "renumbered"


class HparamError(ValueError):
    """A method's setting that cannot run; `key` names the hyperparameter (None: the budget itself)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Hparam:
    """What a hyperparameter accepts beyond the type its default (or annotation) gives: `choices`, a closed range
    [`min`, `max`] for numbers, or `types` replacing the derived types (e.g. `(str, list)` for "fit" or a list)."""

    choices: tuple | None = None  # checked on a value that is not a list
    min: float | None = None
    max: float | None = None
    types: tuple[type, ...] | None = None


_ANNOTATION_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "list": list}


def _declared_types(parameter: inspect.Parameter) -> tuple[type, ...] | None:
    """The YAML types a keyword parameter takes, from a simple annotation (`int | None`) or else its default's type;
    None: anything (a None default without annotation)."""
    annotation = parameter.annotation
    if isinstance(annotation, str):
        names = [name.strip() for name in annotation.split("|")]
        if all(name in _ANNOTATION_TYPES for name in names):
            return tuple(_ANNOTATION_TYPES[name] for name in names)
    elif annotation in _ANNOTATION_TYPES.values():
        return (annotation,)
    default = parameter.default
    if default is None:
        return None
    return (list,) if isinstance(default, (list, tuple)) else (type(default),)


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(t, "null" if t is type(None) else t.__name__) for t in types)


def _check_value(method: str, key: str, value, types: tuple[type, ...] | None, spec: Hparam | None) -> None:
    types = spec.types if spec is not None and spec.types is not None else types
    if types is not None:
        if isinstance(value, bool):  # YAML's true is not the integer 1 here
            ok = bool in types
        elif isinstance(value, int):
            ok = int in types or float in types
        elif isinstance(value, tuple):
            ok = list in types
        else:
            ok = isinstance(value, types)
        if not ok:
            raise HparamError(key, f"method {method!r}: {key} must be {_type_name(types)}, got {value!r}")
    if spec is None:
        return
    if spec.choices is not None and not isinstance(value, list) and value not in spec.choices:
        allowed = ", ".join(map(str, spec.choices))
        raise HparamError(key, f"method {method!r}: {key} must be one of {allowed}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            bounds = f"at least {spec.min}" if spec.max is None else f"at most {spec.max}"
            if spec.min is not None and spec.max is not None:
                bounds = f"between {spec.min} and {spec.max}"
            raise HparamError(key, f"method {method!r}: {key} must be {bounds}, got {value!r}")


@dataclass(frozen=True)
class InLLM:
    """How the decoder loop runs an in-LLM method: `schedule` (None: one stage at the selection function's `layer`)
    and the position ids its reference gives the tokens after pruning ("original" or "renumbered")."""

    schedule: Callable[..., list[Stage]] | None = None
    positions: str = "original"


# How an in-LLM method's budget counts by default: visual tokens averaged over the LLM's layers (`vtc.models.inllm`)
DEFAULT_BUDGET_MODE = "layer_average"
BUDGET_MODES = ("layer_average", "kept")

_REGISTRY: dict[str, Method] = {}
_STAGES: dict[str, str] = {}
_IN_LLM: dict[str, InLLM] = {}
_OWN_COUNT: set[str] = set()
_HPARAMS: dict[str, dict[str, Hparam]] = {}
# "tokens": a pure function of the cached encoder outputs (VisualTokens); "encoder": runs the vision tower itself;
# "llm": selects the image tokens that layers K … of the language model process (LayerState → kept indices);
# "question": as "tokens", for one (image, question) pair per row (VisualTokens.questions).
STAGES = ("tokens", "encoder", "llm", "question")


def register_method(
    name: str,
    *,
    stage: str = "tokens",
    schedule: Callable[..., list[Stage]] | None = None,
    positions: str = "original",
    hparams: dict[str, Hparam] | None = None,
    own_count: bool = False,
) -> Callable[[Method], Method]:
    """`schedule` and `positions` describe an in-LLM method (stage "llm"), see `InLLM`; `hparams` the choices and
    ranges of its keyword hyperparameters (or of its schedule's), see `Hparam`; `own_count` a method that keeps a
    token count of its own per image and ignores the budget (`Reduced.lengths`, `keeps_own_count`)."""
    if stage not in STAGES:
        raise ValueError(f"stage of method {name!r} must be one of {STAGES}, got {stage!r}")
    if stage != "llm" and (schedule is not None or positions != "original"):
        raise ValueError(f"method {name!r}: schedule and positions describe in-LLM methods (stage 'llm') only")

    def decorator(fn: Method) -> Method:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__module__}")
        declared = set(_keyword_parameters(fn)) | set(_keyword_parameters(schedule) if schedule else {})
        undeclared = sorted(set(hparams or {}) - declared)
        if undeclared:
            raise ValueError(f"method {name!r}: hparams names {undeclared}, which are not keyword parameters")
        _REGISTRY[name] = fn
        _STAGES[name] = stage
        _HPARAMS[name] = dict(hparams or {})
        if stage == "llm":
            _IN_LLM[name] = InLLM(schedule, positions)
        if own_count:
            _OWN_COUNT.add(name)
        return fn

    return decorator


def get_method(name: str) -> Method:
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_stage(name: str) -> str:
    """ "tokens" for a method of the encode cache, "encoder" for one that runs the vision tower itself, "llm" for one
    that prunes inside the language model, "question" for one of the encode cache that also reads each question."""
    get_method(name)
    return _STAGES[name]


def keeps_own_count(name: str) -> bool:
    """Whether a method keeps a token count of its own per image (PruMerge's adaptive form): it ignores the budget,
    returns `Reduced.lengths`, and is reported at the counts it reaches."""
    get_method(name)
    return name in _OWN_COUNT


def in_llm(name: str) -> InLLM:
    """The schedule and default positions of an in-LLM method (stage "llm")."""
    if method_stage(name) != "llm":
        raise ValueError(f"method {name!r} does not prune inside the language model")
    return _IN_LLM[name]


def method_entry(name: str, entry: dict | None) -> tuple[str, dict]:
    """A `methods.<name>` config entry → (registered method name, hyperparameters).

    An entry may run a registered method under a name of its own through a `method` key, so that several
    settings of one method sit side by side in one study: `cluster_grid: {method: cluster, init: grid}`. Its
    `budgets` key (the workflow's, see `entry_budgets`) is not a hyperparameter.
    """
    hparams = dict(entry or {})
    hparams.pop("budgets", None)
    return hparams.pop("method", name), hparams


def resolved_hparams(method: str, hparams: dict, pre_llm_positions: str = PRE_LLM_POSITIONS) -> dict:
    """`hparams` with every hyperparameter the method leaves at its default written out.

    What a result's cache key and metrics record, so that they name every setting a run used and a changed
    default makes earlier results stale (snakemake reruns on changed params) instead of silently reused. For an
    in-LLM method the schedule's and the pruning loop's hyperparameters count too. `pre_llm_positions`: the default
    `positions` of a method that reduces before the LLM, the model family's (`PROVIDES["positions"]` of
    `vtc.models.<family>`: renumbered on LLaVA, original on Qwen2.5-VL). Raises `HparamError` naming
    a hyperparameter the method does not take or a `positions` that is not one of `POSITIONS`.
    """
    parameters = _keyword_parameters(get_method(method))
    specs = dict(_HPARAMS[method])
    if method_stage(method) == "llm":
        spec = in_llm(method)
        if spec.schedule is not None:  # the schedule places the stages, not the selection's own `layer`
            parameters.pop("layer", None)
            parameters |= _keyword_parameters(spec.schedule)
        defaults = {name: p.default for name, p in parameters.items()}
        defaults |= {"positions": spec.positions, "budget_mode": DEFAULT_BUDGET_MODE}
        specs["budget_mode"] = Hparam(choices=BUDGET_MODES, types=(str,))
    else:
        defaults = {name: p.default for name, p in parameters.items()}
        defaults |= {"positions": pre_llm_positions}
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults))
        raise HparamError(unknown[0], f"method {method!r} has no hyperparameter {unknown[0]!r}; it takes {allowed}")
    specs["positions"] = Hparam(choices=POSITIONS, types=(str,))
    for key, value in hparams.items():
        types = _declared_types(parameters[key]) if key in parameters else None
        _check_value(method, key, value, types, specs.get(key))
    return {**defaults, **hparams}


def split_positions(hparams: dict) -> tuple[str, dict]:
    """(positions, the hyperparameters the method function takes) of a method that reduces before the LLM: the
    pipeline places the tokens, so the function never sees `positions`."""
    own = dict(hparams)
    return own.pop("positions", PRE_LLM_POSITIONS), own


def _keyword_parameters(fn) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters with a default: a method's hyperparameters."""
    parameters = inspect.signature(fn).parameters.values()
    return {p.name: p for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


def entry_budgets(entry: dict | None, budgets: list[int]) -> list[int]:
    """The budgets a `methods.<name>` entry runs at: its own `budgets` key, else the study's `budgets`.

    For a method that cannot reach every study budget on some model (ToMe merges at most half of the tokens per
    encoder layer, so a tower with 3 layers before its feature layer cannot go below N/8).
    """
    return list((entry or {}).get("budgets", budgets))


def parse_budget(text: str | int | float) -> int | float:
    """A budget from a config or a path: a count (int, "64") or a ratio of each image's tokens (float in (0, 1],
    "0.111")."""
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
        return int(text)
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"a budget is a token count (an integer) or a ratio in (0, 1], got {text!r}")
    return value


def available_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


_PLUGINS: set[str] = set()


def import_plugins(modules: list[str]) -> None:
    """Imports user modules (dotted names or .py paths) so their `@register_method` calls run; each once, however
    often it is asked for (a .py file run twice would register its methods twice)."""
    for module in modules:
        name = str(Path(module).resolve()) if module.endswith(".py") else module
        if name in _PLUGINS:
            continue
        if module.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"vtc_plugin_{abs(hash(module))}", module)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import method plugin file {module!r}")
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        else:
            importlib.import_module(module)
        _PLUGINS.add(name)


@functools.cache  # once per process: every `get_method` call used to rescan the package (~ms, inside timed loops)
def _import_builtin_methods() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def selection(tokens: VisualTokens, keep: torch.Tensor) -> Reduced:
    """Reduced sequence made of the kept patches themselves. keep: [B, k] patch indices, in feed order."""
    batch = torch.arange(keep.shape[0], device=keep.device)[:, None]
    sources = torch.zeros(*keep.shape, tokens.num_patches, dtype=torch.bool, device=keep.device)
    sources[batch, torch.arange(keep.shape[1], device=keep.device)[None, :], keep] = True
    return Reduced(tokens=tokens.projected[batch, keep], sources=sources)
