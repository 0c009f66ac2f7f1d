"""Everything about a study's configuration that can be known before any job runs, checked at once.

The workflow calls `check_files` on the YAML files Snakemake loaded and `check_config` on the merged config while
it parses (workflow/rules/common.smk), before it plans or deletes anything, so a config error never costs an existing
result. Each message names the config key (or the file and line) and what is allowed:

- the JSON schema (workflow/schemas/config.schema.yaml), whose defaults are then filled in;
- duplicate keys (YAML keeps the last silently) and syntax errors, with file and line;
- `plugins`: an import error names the plugin file and line;
- `methods`: registered names and every hyperparameter value, through each method's declaration
  (`vtc.methods.register_method(..., hparams=...)`);
- `datasets`: registered benchmarks; a local `source` that is missing, or has no parquet for `split`;
- `models`: a local `path` that is missing or has no config.json (a path that is not on this machine and looks like
  `org/name` is a hub id), and `num_visual_tokens` against the model's own config when it is on this machine;
- `budgets` (and `methods.<name>.budgets`) against each model's visual tokens.

`python -m vtc.config_check my_study.yaml` runs the same checks outside Snakemake, e.g. on a file whose YAML
Snakemake cannot read (it then says only "Config file is not valid JSON or YAML").
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# The generated testbed (rule generate_shapes) and its splits (the workflow's `split` wildcard).
SHAPES_SOURCE = "resources/shapes"
SHAPES_SPLITS = ("train", "validation", "test")


class ConfigError(ValueError):
    """Every problem found, one `config key '...': ...` (or `file, line N: ...`) line each."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


# --- YAML ------------------------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    """A YAML config file, refusing duplicate keys and naming the file and line of any error."""
    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError([_yaml_error(path, error)]) from None
    problems = list(_duplicate_keys(node, [], path)) if node is not None else []
    if problems:
        raise ConfigError(problems)
    return yaml.safe_load(text) or {}


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return f"{path}{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


def _duplicate_keys(node, path: list[str], file: Path):
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join([*path, key])
                yield f"config key '{dotted}': given twice in {file} (lines {seen[key]} and {line}); YAML would keep the last"
            seen.setdefault(key, line)
            yield from _duplicate_keys(value_node, [*path, key], file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, [*path, str(index)], file)


def check_files(paths) -> None:
    """Duplicate keys and syntax errors in the config files a study is made of."""
    problems = []
    for path in paths:
        try:
            load_yaml(Path(path))
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)


# --- the merged config -----------------------------------------------------------------------------------------------


def check_schema(config: dict, schema: Path = SCHEMA) -> None:
    """The JSON schema, every error with its key; then the schema's defaults are filled into `config`."""
    import jsonschema

    rules = yaml.safe_load(Path(schema).read_text())
    errors = sorted(jsonschema.Draft202012Validator(rules).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(
            [f"config key '{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}': {e.message}" for e in errors]
        )
    from snakemake.utils import validate

    validate(config, schema=str(schema))  # fills in the schema's defaults


def check_config(config: dict, schema: Path = SCHEMA, base: Path | None = None) -> None:
    """All checks of the module docstring on a merged config (defaults are filled in); raises `ConfigError` listing
    every problem. Relative paths are taken from `base` (default: the working directory, as jobs do)."""
    base = Path.cwd() if base is None else Path(base)
    check_schema(config, schema)
    problems = check_plugins(config.get("plugins", []), base)
    if problems:  # methods cannot be checked without their plugins
        raise ConfigError(problems)
    fill_token_counts(config)
    problems = check_methods(config) + check_method_models(config) + check_datasets(config, base)
    problems += check_models(config, base)
    if problems:
        raise ConfigError(problems)


# Visual tokens per image of a family whose count is fixed, where the entry leaves it unset (LLaVA-1.5's 24 × 24)
FIXED_TOKEN_COUNTS = {"llava": 576}


def fill_token_counts(config: dict) -> None:
    for model in config["models"].values():
        family = model.get("family", "llava")
        if "num_visual_tokens" not in model and family in FIXED_TOKEN_COUNTS:
            model["num_visual_tokens"] = FIXED_TOKEN_COUNTS[family]


def check_method_models(config: dict) -> list[str]:
    """Each method on each model: refused, naming both, where the model's family does not give the method what it
    needs (`PROVIDES` of `vtc.models.<family>`): the vision tower for an encoder-stage method (ToMe), the pruning
    decoder loop for an in-LLM one; and the saliency study, which records LLaVA-1.5's attention."""
    from vtc.methods import available_methods, method_entry, method_stage
    from vtc.models import family

    problems, registered = [], set(available_methods())
    for model_name, model in config["models"].items():
        provides = family(model).PROVIDES
        name_of_family = model.get("family", "llava")
        if name_of_family != "llava" and "num_visual_tokens" in model:
            problems.append(
                f"config key 'models.{model_name}.num_visual_tokens': family {name_of_family!r} gives each image its "
                "own number of tokens; leave it unset (`full` then runs at the ratio 1.0)"
            )
        for name, entry in config["methods"].items():
            method = method_entry(name, entry)[0]
            if method not in registered:
                continue  # reported by check_methods
            stage = method_stage(method)
            if stage == "encoder" and not provides["encoder_methods"]:
                reason = "merges inside the vision tower, which vtc runs for LLaVA-1.5's CLIP tower only"
            elif stage == "llm" and not provides["in_llm"]:
                reason = "prunes inside the language model, whose decoder loop (vtc.models.inllm) does not run it yet"
            else:
                continue
            problems.append(f"config key 'methods.{name}': method {method!r} cannot run on model {model_name!r} "
                            f"(family {name_of_family!r}): it {reason}")  # fmt: skip
        saliency = config.get("saliency") or {}
        if saliency.get("datasets") and name_of_family != "llava":
            problems.append(f"config key 'saliency.datasets': the saliency study records LLaVA-1.5's attention; model "
                            f"{model_name!r} is family {name_of_family!r} (set saliency.datasets: [])")  # fmt: skip
    return problems


def check_plugins(plugins: list[str], base: Path) -> list[str]:
    from vtc.methods import import_plugins

    problems = []
    for index, module in enumerate(plugins):
        key = f"config key 'plugins.{index}'"
        if module.endswith(".py") and not _resolve(module, base).is_file():
            problems.append(f"{key}: plugin file {module!r} does not exist ({_resolve(module, base)})")
            continue
        try:
            import_plugins([str(_resolve(module, base)) if module.endswith(".py") else module])
        except Exception as error:  # noqa: BLE001 - any error in user code is reported, with where it happened
            problems.append(f"{key}: cannot import plugin {module!r}: {_where(error)}")
    return problems


def _where(error: BaseException) -> str:
    """`file, line N: Type: message` of the innermost frame outside the import machinery."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}, line {error.lineno}: SyntaxError: {error.msg}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "importlib" not in f.filename]
    frames = [f for f in frames if Path(f.filename).resolve() != Path(__file__).resolve()] or frames
    location = f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames else ""
    return f"{location}{type(error).__name__}: {error}"


def check_methods(config: dict) -> list[str]:
    """Registered names, hyperparameters (unknown keys and values), benchmarks and budgets against token counts."""
    from vtc.benchmarks import available_benchmarks
    from vtc.methods import HparamError, available_methods, method_entry, resolved_hparams

    problems = []
    methods, benchmarks = available_methods(), available_benchmarks()
    for name, entry in config["methods"].items():
        method, hparams = method_entry(name, entry)
        if method not in methods:
            key = f"methods.{name}.method" if method != name else f"methods.{name}"
            problems.append(f"config key '{key}': unknown method {method!r}; registered: {', '.join(methods)}")
            continue
        try:
            resolved_hparams(method, hparams)
        except HparamError as error:
            problems.append(f"config key 'methods.{name}.{error.key}': {error}")
    for name, dataset in config["datasets"].items():
        if dataset["benchmark"] not in benchmarks:
            problems.append(
                f"config key 'datasets.{name}.benchmark': unknown benchmark {dataset['benchmark']!r}; "
                f"registered: {', '.join(benchmarks)}"
            )
    budget_keys = {"budgets": config["budgets"]}
    for name, entry in config["methods"].items():
        if "budgets" in (entry or {}):
            budget_keys[f"methods.{name}.budgets"] = entry["budgets"]
    for key, budgets in budget_keys.items():
        for budget in budgets:
            if isinstance(budget, float) and budget > 1:
                problems.append(f"config key '{key}': {budget} is neither a count (write it without a point) nor a "
                                "ratio in (0, 1]")  # fmt: skip
    for name, model in config["models"].items():
        for key, budgets in budget_keys.items():
            for budget in budgets:
                if isinstance(budget, int) and "num_visual_tokens" in model and budget > model["num_visual_tokens"]:
                    problems.append(
                        f"config key '{key}': {budget} is above the {model['num_visual_tokens']} visual "
                        f"tokens of model {name!r} (models.{name}.num_visual_tokens)"
                    )
    return problems


def _resolve(path: str, base: Path) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else base / expanded


def looks_local(path: str, base: Path) -> bool:
    """Whether `path` (a model path or dataset source) means a file or directory of this machine rather than a hub id
    (`org/name`): it exists, or is written as a path (absolute, ./, ../, ~, more than one /, a file suffix), or its
    first component is a local directory (a typo in `models/my-modle` is a missing directory, not a hub repo)."""
    if _resolve(path, base).exists() or path.startswith(("/", "./", "../", "~")) or path.count("/") != 1:
        return True
    return Path(path).suffix in (".parquet", ".json") or (base / path.split("/")[0]).is_dir()


def check_datasets(config: dict, base: Path) -> list[str]:
    problems = []
    for name, dataset in config["datasets"].items():
        source, split = dataset["source"], dataset["split"]
        if dataset["benchmark"] == "shapes" and source == SHAPES_SOURCE:
            if split not in SHAPES_SPLITS:
                problems.append(
                    f"config key 'datasets.{name}.split': the generated shapes testbed has splits "
                    f"{', '.join(SHAPES_SPLITS)}, not {split!r}"
                )
            continue
        if not looks_local(source, base):
            continue  # a hub dataset: its job fetches it
        root = _resolve(source, base)
        if not root.exists():
            problems.append(f"config key 'datasets.{name}.source': local path {source!r} does not exist ({root})")
        elif root.is_dir():
            splits = local_splits(root)
            if split not in splits:
                found = ", ".join(sorted(splits)) or "none"
                problems.append(
                    f"config key 'datasets.{name}.split': no parquet for split {split!r} under {root}; "
                    f"splits found: {found}"
                )
    return problems


def local_splits(root: Path) -> set[str]:
    """Split names of a local parquet mirror (`<split>-*.parquet`, `<split>.parquet` or `<split>/*.parquet` at any
    depth up to three folders, as `vtc.benchmarks._loading` reads them)."""
    splits = set()
    for depth in range(4):
        for file in root.glob("/".join(["*"] * depth + ["*.parquet"])):
            if "-" in file.stem:  # <split>-00000-of-00001.parquet
                splits.add(file.stem.split("-")[0])
            else:  # <split>.parquet or <split>/<name>.parquet
                splits.add(file.stem)
                if depth:
                    splits.add(file.parent.name)
    return splits


def model_config(path: str, revision: str | None, base: Path) -> tuple[dict, Path] | None:
    """(config.json, its file) of a model on this machine (a local directory or the hub cache), else None."""
    local = _resolve(path, base)
    if local.is_dir():
        file = local / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - a malformed hub id is left to the job
            return None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    return (json.loads(file.read_text()), file) if file.is_file() else None


def visual_tokens(model: dict) -> tuple[int, str] | None:
    """(image tokens per image, how) of a LLaVA config.json; None for an architecture whose count is not fixed."""
    if model.get("model_type") != "llava":
        return None
    vision = model.get("vision_config") or {}
    if "image_size" in vision and "patch_size" in vision:
        grid = vision["image_size"] // vision["patch_size"]
        full = model.get("vision_feature_select_strategy", "default") == "full"
        return grid * grid + full, f"image_size {vision['image_size']} / patch_size {vision['patch_size']}"
    if "image_seq_length" in model:
        return model["image_seq_length"], "image_seq_length"
    return None


def check_models(config: dict, base: Path) -> list[str]:
    problems = []
    for name, model in config["models"].items():
        path = model["path"]
        key = f"config key 'models.{name}.path'"
        if looks_local(path, base):
            local = _resolve(path, base)
            if not local.exists():
                problems.append(f"{key}: local model directory {path!r} does not exist ({local})")
                continue
            if not (local / "config.json").is_file():
                problems.append(f"{key}: {path!r} is not a model directory: it has no config.json ({local})")
                continue
        found = model_config(path, model.get("revision"), base)
        counted = visual_tokens(found[0]) if found else None
        if counted is not None and counted[0] != model["num_visual_tokens"]:
            problems.append(
                f"config key 'models.{name}.num_visual_tokens': {model['num_visual_tokens']}, but the model gives "
                f"{counted[0]} visual tokens per image ({counted[1]} in {found[1]})"
            )
    return problems


def main(argv: list[str]) -> int:
    """`python -m vtc.config_check FILE...`: the checks on the merged files, as `snakemake --configfile FILE...`."""
    try:
        check_files(argv)
        from snakemake.utils import update_config

        config: dict = {}
        for path in argv:
            update_config(config, load_yaml(Path(path)))
        check_config(config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{', '.join(argv)}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
