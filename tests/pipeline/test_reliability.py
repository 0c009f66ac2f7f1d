"""Nothing lost, nothing wrongly trusted: jobs run this checkout's code, W&B without network, crash recovery,
validation before any job, bad data rows and damaged cache shards (issue 20)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_API_KEY")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def test_a_job_imports_the_checkouts_own_src(tmp_path):
    """A second clone's job runs the second clone's `src/`, not whichever `vtc` the environment has installed."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, clone / name)
    for name in ("workflow", "src", "envs"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["shapes"] = {"test": 4}
    (clone / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(SNAKEMAKE), "-s", "Snakefile", "--cores", "1", "resources/shapes/test.parquet"],
        cwd=clone, capture_output=True, text=True, env=clean_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (clone / "logs" / "generate_shapes" / "test.log").read_text()
    assert f"vtc: {clone / 'src' / 'vtc' / '__init__.py'}" in log, log


def closed_port() -> int:
    """A localhost port nothing listens on: a W&B server there refuses at once, as a machine without network."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_KEY = "f4ke" * 10


def no_network_env() -> dict:
    env = clean_env(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    del env["WANDB_MODE"]
    return env


def assert_key_nowhere(*places: Path, text: str = "") -> None:
    assert FAKE_KEY not in text
    for place in places:
        for path in place.rglob("*"):
            if path.is_file():
                assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_wandb_without_network_falls_back_offline_within_the_configured_wait(tmp_path):
    """With a key set and no server, `auto` tries online, gives up after `init_timeout` and finishes offline
    under the same run id (the failed init used to hold it: "run ID ... is in use")."""
    script = (
        "import json, sys, time\n"
        "from vtc.tracking import wandb_run\n"
        "start = time.time()\n"
        f"settings = {{'mode': 'auto', 'group': 'g', 'dir': {str(tmp_path / 'wandb')!r}, 'init_timeout': 2}}\n"
        "with wandb_run(settings, job_type='evaluate', name='n', config={'a': 1}) as run:\n"
        "    run.log({'accuracy': 0.5})\n"
        "    print(json.dumps({'id': run.id, 'offline': run.settings._offline, 'seconds': time.time() - start}))\n"
    )
    env = {**no_network_env(), "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["offline"] and report["seconds"] < 30, report
    assert "logging offline instead" in result.stderr
    assert list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{report['id']}/run-{report['id']}.wandb"))
    assert_key_nowhere(tmp_path, text=result.stdout + result.stderr)


def small_study(workdir: Path, model_dir: Path, **overrides) -> Path:
    """A study of a few minutes' CPU: 8 questions, the tiny model, two methods at one budget."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"] = {"tiny": {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
    config["shapes"] = {"test": 8}
    config["methods"] = {"full": {}, "pool": {}}
    config["budgets"] = [16]
    config["efficiency"] = {"measure": False}
    config["saliency"]["datasets"] = []  # the saliency pass's own reruns are tested in tests/test_saliency.py
    config["wandb"] = {"mode": "auto", "init_timeout": 2}
    config.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]


def run_snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_cmd(workdir, *args), capture_output=True, text=True, env=env or clean_env(), timeout=900
    )


def results_without_timings(workdir: Path):
    import polars as pl

    table = pl.read_parquet(workdir / "results/tables/shapes-demo/results.parquet")
    timing = [c for c in table.columns if "seconds" in c or c.endswith("_ms") or c.startswith("measured")]
    table = table.drop(timing).filter(~pl.col("metric").str.contains("seconds|_ms|per_second|measured"))
    return table.sort(table.columns)


def recovery_commands() -> list[list[str]]:
    """The commands the README's "Reruns" paragraph tells a user to type after a crash, in order."""
    import shlex

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Reruns.**") :]
    block = section[section.index("```sh\n") + 6 : section.index("```\n", section.index("```sh\n") + 6)]
    commands = [shlex.split(line.split("#")[0])[1:] for line in block.splitlines() if line.startswith("snakemake ")]
    assert commands, block
    return commands


def start_and_kill(workdir: Path, args: list[str], after: float, env: dict) -> bool:
    """Starts Snakemake in its own process group and SIGKILLs the whole group (Snakemake and its jobs, as a
    lost node) after `after` seconds; returns whether it was still running then."""
    import signal
    import time

    process = subprocess.Popen(
        snakemake_cmd(workdir, *args), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        process.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.time() + 30
        while time.time() < deadline:  # wait for every job of the group to be gone
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        raise AssertionError("processes of the killed group survived")


@pytest.mark.slow
def test_killed_study_recovers_with_the_readme_commands_to_the_same_results(tmp_path, tiny_model_dir):
    """kill -9 at two random moments (the second during the recovery), then the README's commands: the results
    equal an uninterrupted run's. The uninterrupted run also has a fake W&B key and no network: its jobs finish,
    offline. Then damaged cache shards are recomputed by the plain command."""
    import random
    import time

    reference = small_study(tmp_path / "reference", tiny_model_dir)
    start = time.time()
    result = run_snakemake(reference, "--cores", "2", env=no_network_env())
    duration = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((reference / "results/evaluate").rglob("metrics.json"))) == 2
    offline = list((reference / "results/wandb/wandb").glob("offline-run-*"))
    assert len(offline) == 3  # two evaluate runs and the aggregate run
    assert_key_nowhere(reference, text=result.stdout + result.stderr)

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    crashed = small_study(tmp_path / "crashed", tiny_model_dir)
    commands = recovery_commands()
    kills = [rng.uniform(0.1, 0.9) * duration, rng.uniform(0.05, 0.5) * duration]
    killed = [start_and_kill(crashed, ["--cores", "2"], kills[0], clean_env())]
    for command in commands[:-1]:
        assert run_snakemake(crashed, *command).returncode == 0
    killed.append(start_and_kill(crashed, commands[-1], kills[1], clean_env()))
    for command in commands:
        result = run_snakemake(crashed, *command)
        assert result.returncode == 0, f"seed {seed}, kills after {kills} s ({killed}): {result.stderr[-3000:]}"
    assert results_without_timings(crashed).equals(results_without_timings(reference)), f"seed {seed}, {kills}"
    assert "Nothing to be done" in run_snakemake(crashed, "-n").stdout

    # A truncated shard: found while Snakemake parses, the store and what depends on it are recomputed by the plain
    # command, with the same results; a dry run plans that and deletes nothing.
    encoded = next((crashed / "results/encode/tiny/shapes").glob("shard-*.safetensors"))
    encoded_bytes = encoded.read_bytes()
    encoded.write_bytes(encoded_bytes[:100])
    plan = run_snakemake(crashed, "-n")
    assert "results/encode/tiny/shapes is damaged, recomputing it" in plan.stderr + plan.stdout
    assert "encode" in plan.stdout and encoded.stat().st_size == 100
    encoded.write_bytes(encoded_bytes)
    reduced = next((crashed / "results/reduce/tiny/shapes/pool/16").glob("shard-*.safetensors"))
    reduced.write_bytes(reduced.read_bytes()[:-7])
    result = run_snakemake(crashed, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "results/reduce/tiny/shapes/pool/16 is damaged, recomputing it" in result.stderr
    assert results_without_timings(crashed).equals(results_without_timings(reference))
    assert "Nothing to be done" in run_snakemake(crashed, "-n").stdout


# --- validation before any job -----------------------------------------------------------------------------------------

TINY = REPO / "models" / "vtc-shapes-tiny"  # a local LLaVA directory: 96 px images, 4 px patches, 576 tokens


def valid_config() -> dict:
    return {
        "experiment": "fuzz",
        "models": {"tiny": {"path": str(TINY), "dtype": "float32", "device": "cpu"}},
        "datasets": {
            "shapes": {"benchmark": "shapes", "source": "resources/shapes", "split": "test"},
            "pope": {"benchmark": "pope", "source": str(REPO / "tests/fixtures/pope"), "split": "test"},
        },
        "methods": {"full": {}, "cluster": {"iters": 2}, "c2": {"method": "cluster", "init": "grid"}, "fastv": {}},
        "budgets": [64, 16],
        "wandb": {"mode": "offline"},
    }


def hparam_mutations(rng):
    """(entry, hyperparameters, the key a message must name) for a value each registered method's declaration
    refuses: a wrong type, a value outside its range or choices, an unknown name."""
    from vtc.methods import _HPARAMS, _keyword_parameters, available_methods, get_method, in_llm, method_stage

    cases = []
    for method in available_methods():
        parameters = _keyword_parameters(get_method(method))
        if method_stage(method) == "llm" and in_llm(method).schedule is not None:
            parameters |= _keyword_parameters(in_llm(method).schedule)
        for name, parameter in parameters.items():
            spec = _HPARAMS[method].get(name)
            default = parameter.default
            bad = []
            if isinstance(default, bool):
                bad += ["yes", 1]
            elif isinstance(default, int) or (spec and spec.min is not None):
                bad += ["three", [1], True] + ([spec.min - rng.randint(1, 5)] if spec and spec.min is not None else [])
                if isinstance(default, int):
                    bad.append(rng.uniform(0.1, 0.9) + rng.randint(0, 3))
            elif isinstance(default, float):
                bad += ["half", True]
            if spec and spec.max is not None:
                bad.append(spec.max + rng.uniform(0.01, 3))
            if spec and spec.choices:
                bad.append(rng.choice(spec.choices) + rng.choice(["+", "x", " ", "_typo"]))
            elif isinstance(default, str):
                bad.append(rng.randint(0, 9))
            cases += [(method, {name: value}, name) for value in bad]
        cases.append((method, {"".join(rng.choices("abcdefgh", k=6)): 1}, None))
        cases.append((method, {"positions": rng.choice(["gapped", 3, "Original"])}, "positions"))
    return cases


def test_every_declared_hyperparameter_value_is_checked_before_any_job():
    import random

    from vtc.config_check import ConfigError, check_config

    rng = random.Random(0)
    cases = hparam_mutations(rng)
    assert len(cases) > 60
    for method, hparams, name in cases:
        config = valid_config()
        config["methods"][f"m_{method}"] = {"method": method, **hparams}
        with pytest.raises(ConfigError) as error:
            check_config(config, base=REPO)
        key = f"methods.m_{method}.{name or next(iter(hparams))}"
        assert f"config key '{key}'" in str(error.value), (hparams, str(error.value))


def test_the_valid_base_config_passes():
    from vtc.config_check import check_config

    check_config(valid_config(), base=REPO)


def bad_configs(rng, tmp: Path):
    """(mutate(config), key the message names, a phrase it contains) for config errors other than hyperparameters."""
    word = "".join(rng.choices("abcdefghij", k=5))
    syntax = tmp / f"syntax_{word}.py"
    syntax.write_text("from vtc.methods import register_method\n\ndef broken(:\n    pass\n")
    raising = tmp / f"raising_{word}.py"
    raising.write_text("import math\n\nraise ImportError('needs a package that is not installed')\n")

    def setter(path, value):
        def mutate(config):
            node = config
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value

        return mutate

    return [
        (setter(["models", "tiny", "path"], f"models/{word}"), "models.tiny.path", "does not exist"),
        (setter(["models", "tiny", "path"], f"./{word}"), "models.tiny.path", "does not exist"),
        (setter(["models", "tiny", "path"], str(tmp)), "models.tiny.path", "no config.json"),
        (setter(["models", "tiny", "num_visual_tokens"], rng.choice([1000, 575, 577])), "models.tiny.num_visual_tokens", "gives 576"),
        (setter(["datasets", "pope", "source"], str(tmp / word)), "datasets.pope.source", "does not exist"),
        (setter(["datasets", "pope", "split"], rng.choice(["tst", "validation", "Test"])), "datasets.pope.split", "splits found: test"),
        (setter(["datasets", "shapes", "split"], rng.choice(["dev", "testdev"])), "datasets.shapes.split", "not"),
        (setter(["datasets", "shapes", "benchmark"], word), "datasets.shapes.benchmark", "unknown benchmark"),
        (setter(["methods", word], {}), f"methods.{word}", "unknown method"),
        (setter(["methods", "c2", "method"], "clustr"), "methods.c2.method", "unknown method"),
        (setter(["budgets"], [64, rng.randint(577, 5000)]), "budgets", "above the 576"),
        (setter(["budgets"], [rng.randint(-5, 0)]), "budgets.0", "minimum"),
        (setter(["budgets"], ["64"]), "budgets.0", "not of type"),
        (setter(["methods", "cluster", "budgets"], [600]), "methods.cluster.budgets", "above the 576"),
        (setter(["plugins"], [str(syntax)]), "plugins.0", f"{syntax}, line 3"),
        (setter(["plugins"], [str(raising)]), "plugins.0", f"{raising}, line 3"),
        (setter(["plugins"], [str(tmp / f"{word}.py")]), "plugins.0", "does not exist"),
        (setter(["plugins"], [f"vtc_no_such_{word}"]), "plugins.0", "No module named"),
        (setter(["wandb", "init_timeout"], rng.choice([0, -1, "fast"])), "wandb.init_timeout", ""),
        (setter(["wandb", "mode"], word), "wandb.mode", "is not one of"),
        (setter([word], 1), "(top level)", "Additional properties"),
    ]


def test_fuzzed_bad_configs_are_rejected_naming_the_key(tmp_path):
    import random

    from vtc.config_check import ConfigError, check_config

    for seed in range(4):
        rng = random.Random(seed)
        for mutate, key, phrase in bad_configs(rng, tmp_path):
            config = valid_config()
            mutate(config)
            with pytest.raises(ConfigError) as error:
                check_config(config, base=REPO)
            message = str(error.value)
            assert f"config key '{key}'" in message and phrase in message, (key, message)


def test_yaml_duplicate_keys_and_syntax_errors_name_file_and_line(tmp_path):
    import random

    from vtc.config_check import ConfigError, check_files

    text = yaml.safe_dump(valid_config(), sort_keys=False)
    lines = text.splitlines()
    rng = random.Random(0)
    for trial in range(20):
        # a key repeated at its own indentation right after its block: a duplicate at any depth
        index = rng.choice([i for i, line in enumerate(lines) if line.rstrip().endswith(":") or ": " in line])
        line = lines[index]
        indent = len(line) - len(line.lstrip())
        end = next((j for j in range(index + 1, len(lines)) if len(lines[j]) - len(lines[j].lstrip()) <= indent), len(lines))
        if lines[index].lstrip().startswith("- "):
            continue
        key = line.strip().split(":")[0]
        path = tmp_path / f"dup{trial}.yaml"
        path.write_text("\n".join(lines[:end] + [" " * indent + key + ": 1"] + lines[end:]) + "\n")
        with pytest.raises(ConfigError) as error:
            check_files([path])
        assert f"{key}': given twice in {path} (lines {index + 1} and {end + 1})" in str(error.value)
    for broken, line_number in (("budgets: [64, 16\nseed: 0\n", 2), ("a:\n  b: 1\n c: 2\n", 3), ("a: 1\n\tb: 2\n", 2)):
        path = tmp_path / "broken.yaml"
        path.write_text(broken)
        with pytest.raises(ConfigError) as error:
            check_files([path])
        assert f"{path}, line {line_number}" in str(error.value), str(error.value)


def test_a_config_error_stops_snakemake_before_any_job_and_keeps_existing_results(tmp_path):
    """A typo in a hyperparameter value on an existing results tree: Snakemake stops while parsing, naming the key,
    and every earlier output is still there (it used to delete the outputs of the jobs it would rerun first)."""
    workdir = small_study(tmp_path, TINY, methods={"full": {}, "cluster": {"init": "kmeans+++"}})
    existing = [workdir / "results/encode/tiny/shapes/manifest.json", workdir / "resources/datasets/shapes.parquet"]
    for path in existing:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("earlier result")
    result = run_snakemake(workdir, "--cores", "1")
    assert result.returncode != 0
    assert "config key 'methods.cluster.init': method 'cluster': init must be one of kmeans++, grid" in result.stderr
    assert not (workdir / "logs").exists()
    assert all(path.read_text() == "earlier result" for path in existing)

    config = (workdir / "config.yaml").read_text().replace("experiment: shapes-demo", "experiment: a\nexperiment: b")
    (workdir / "dup.yaml").write_text(config)
    result = run_snakemake(workdir, "-n", "--configfile", str(workdir / "dup.yaml"))
    output = result.stdout + result.stderr  # a dry run reports on stdout
    assert result.returncode != 0 and f"config key 'experiment': given twice in {workdir / 'dup.yaml'}" in output


# --- bad data rows --------------------------------------------------------------------------------------------------


def bad_rows_source(tmp: Path) -> tuple[Path, dict]:
    """A shapes split of 12 questions, 6 of them broken in a different way each; returns (source, {id: reason})."""
    import io

    from PIL import Image

    from vtc.data.shapes import generate_split

    samples = generate_split(12, seed=0, split="test")
    big = io.BytesIO()
    Image.new("1", (12000, 8000)).save(big, format="PNG")  # 96 M pixels, over PIL's 89 M limit; 10 kB of PNG
    breakages = {
        "unreadable image": lambda s: s.update(image={"bytes": s["image"]["bytes"][:40], "path": None}),
        "missing image": lambda s: s.update(image={"bytes": None, "path": str(tmp / "gone.png")}),
        "oversized image": lambda s: s.update(image={"bytes": big.getvalue(), "path": None}),
        "empty question": lambda s: s.update(question="  "),
        "empty answers": lambda s: s.update(answers=[]),
    }
    broken = {}
    for index, (reason, breakage) in enumerate([*breakages.items(), ("empty answers", lambda s: s.update(answers=[""]))]):
        sample = samples[2 * index]
        breakage(sample)
        sample["image_id"] = f"broken-{index}"
        broken[sample["id"]] = reason
    source = tmp / "source"
    source.mkdir()
    # pyarrow, not datasets: datasets would read a missing image's path while writing
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(samples), source / "test.parquet")
    return source, broken


def test_bad_rows_are_skipped_and_counted_by_default(tmp_path):
    import json

    from vtc.benchmarks import read_common_parquet
    from vtc.pipeline.prepare import prepare_dataset, rows_report_path

    source, broken = bad_rows_source(tmp_path)
    out = tmp_path / "d.parquet"
    assert prepare_dataset("shapes", str(source), "test", None, None, 0, out, name="mine") == 6
    ids = set(read_common_parquet(out)["id"])
    assert len(ids) == 6 and not ids & set(broken)
    report = json.loads(rows_report_path(out).read_text())
    assert (report["read"], report["kept"], report["skipped"]) == (12, 6, 6)
    assert report["skipped_by_reason"] == {
        "unreadable image": 1, "missing image": 1, "oversized image": 1, "empty question": 1, "empty answers": 2
    }  # fmt: skip
    assert {row["id"]: row["reason"].split(":")[0] for row in report["skipped_rows"]} == broken


def test_bad_rows_stop_the_job_naming_dataset_row_and_image_when_configured(tmp_path):
    from vtc.pipeline.prepare import prepare_dataset

    source, broken = bad_rows_source(tmp_path)
    first = next(iter(broken))
    with pytest.raises(ValueError, match=f"dataset 'mine': row '{first}' \\(image 'broken-0'\\): unreadable image"):
        prepare_dataset("shapes", str(source), "test", None, None, 0, tmp_path / "d.parquet", on_bad_rows="stop", name="mine")
    assert not (tmp_path / "d.parquet").exists()


def test_skipped_rows_reach_metrics_and_the_results_table(tmp_path):
    """aggregate: a `skipped_rows` metric whose n is the rows read, next to metrics whose n is the rows kept."""
    import json

    from vtc.pipeline.aggregate import tidy

    result = {
        "model": "m", "dataset": "d", "method": "full", "budget": 576, "n": 6, "num_visual_tokens": [576],
        "metrics": {"accuracy": 50.0}, "experiment": "e",
        "dataset_rows": {"read": 12, "kept": 6, "skipped": 6, "skipped_by_reason": {"empty question": 6}},
    }  # fmt: skip
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(result))
    table = tidy([path])
    rows = {r["metric"]: (r["value"], r["n"]) for r in table.iter_rows(named=True)}
    assert rows["accuracy"] == (50.0, 6) and rows["skipped_rows"] == (6.0, 12)


# --- damaged cache shards ---------------------------------------------------------------------------------------------


def small_store(path: Path):
    import torch

    from vtc.cache import StoreWriter

    writer = StoreWriter(path, {"k": 1})
    for shard in range(3):
        writer.add([f"img{shard}"], {"projected": torch.full((1, 4, 8), float(shard))})
    return writer.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_shard_is_named_and_never_read(tmp_path, damage, monkeypatch):
    from vtc.cache import DamagedStore, Store, damaged

    manifest = small_store(tmp_path / "s")
    assert all({"bytes", "sha256"} <= set(shard) for shard in manifest["shards"])
    assert damaged(tmp_path / "s") == []
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        assert damaged(tmp_path / "s") == [f"{shard} has {len(data) // 2} bytes, the manifest recorded {len(data)}"]
    elif damage == "flip":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        assert damaged(tmp_path / "s") == []  # same size: only a reader, which hashes, can tell
    else:
        shard.unlink()
    parsed = []
    monkeypatch.setattr("vtc.cache.load", lambda data: parsed.append(data) or {})
    store = Store.open(tmp_path / "s", {"k": 1})
    with pytest.raises(DamagedStore, match=f"{shard}.*the store is not read"):
        list(store.shards())
    assert len(parsed) == 1  # shard 0 only: the damaged one never reached the parser
    assert any(str(shard) in problem for problem in damaged(tmp_path / "s"))  # the next run recomputes it
