"""lmms-eval's own scoring code, imported offline for the differential tests (test_lmms_eval_parity.py).

lmms-eval is installed without its dependencies (`make setup`: `pip install --no-deps lmms-eval==0.7.3
loguru==0.7.3`): the task files vtc follows need only loguru, pandas, numpy, pyyaml, requests and datasets.

Two things are not imported the normal way, and neither touches the scoring code:

- `lmms_eval/tasks/__init__.py` builds lmms-eval's task registry; it imports the whole evaluation API (torch,
  accelerate, HF evaluate, sacrebleu, ...). We register `lmms_eval.tasks` as a bare package pointing at the real
  directory, so `import lmms_eval.tasks.<task>.utils` executes the real task files, unchanged, without it.
- GQA has no `process_results`: lmms-eval scores it with the registered `exact_match` metric of
  `lmms_eval/api/metrics.py`. That file is loaded from its path with two stand-ins: `sacrebleu` (used only by its
  BLEU/chrF/TER metrics) and `lmms_eval.api.registry`, whose `register_metric` / `register_aggregation`
  decorators return the function unchanged (the real module imports HF evaluate and the torch model base class
  only to fill its registries). Both are removed from `sys.modules` again afterwards.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

VERSION = "0.7.3"


def _stub_registry() -> types.ModuleType:
    registry = types.ModuleType("lmms_eval.api.registry")

    def register_metric(**_):
        return lambda fn: fn

    def register_aggregation(_name):
        return lambda fn: fn

    registry.register_metric = register_metric
    registry.register_aggregation = register_aggregation
    return registry


def _load_api_metrics(root: Path) -> types.ModuleType:
    stubs = {"sacrebleu": types.ModuleType("sacrebleu"), "lmms_eval.api.registry": _stub_registry()}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_lmms_eval_api_metrics", root / "api" / "metrics.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def load() -> types.SimpleNamespace:
    """The lmms-eval modules the tests call, after checking the installed version is the one vtc follows."""
    try:
        installed = importlib.metadata.version("lmms-eval")
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(
            f"lmms-eval is not installed; run `pip install --no-deps lmms-eval=={VERSION} loguru==0.7.3` "
            "(make setup does)"
        ) from error
    if installed != VERSION:
        raise RuntimeError(f"lmms-eval {installed} is installed; the parity tests need {VERSION}")
    import lmms_eval

    root = Path(lmms_eval.__file__).resolve().parent
    if "lmms_eval.tasks" not in sys.modules:
        package = types.ModuleType("lmms_eval.tasks")
        package.__path__ = [str(root / "tasks")]
        sys.modules["lmms_eval.tasks"] = package

    def task(name: str) -> types.ModuleType:
        return importlib.import_module(f"lmms_eval.tasks.{name}")

    return types.SimpleNamespace(
        root=root,
        metrics=_load_api_metrics(root),
        gqa=task("gqa.utils"),
        vqav2=task("vqav2.utils"),
        textvqa=task("textvqa.utils"),
        pope=task("pope.utils"),
        mme=task("mme.utils"),
        scienceqa=task("scienceqa.utils"),
        seedbench=task("seedbench.utils"),
        mmbench=task("mmbench.en_utils"),
        mcq_extract=task("_task_utils.mcq_extract"),
        mmmu=task("mmmu.utils"),
        mmmu_mcq=task("_task_utils.mmmu_mcq_utils"),
    )
