"""Records you can trust: no run overwrites another, every bad setting is refused by name, a kill never
loses what was written. Each test states one property of the runner (issue "Records you can trust")."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree.config_check import ConfigError
from bpfree.records import RecordConflict, identify, read_records
from run import run
from tests.conftest import CACHE, ROOT, compose_cfg, data_root

TINY = ["data.subset=256", "data.test_subset=200", "trainer.epochs=1", "trainer.progress=false"]


def _cli(args: list[str], cwd=ROOT, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "BPFREE_DATA": str(data_root()), "BPFREE_CACHE": str(CACHE)}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- 1. names: a sweep never shares a record or a checkpoint -------------------------------------------

def test_sweep_over_depth_writes_one_record_per_config_and_a_diverged_job_does_not_stop_it(tmp_path):
    p = _cli(["-m", "model=mlp_depth", "model.depth=1,2", "optim.lr=1e-3,1e30", "trainer.check_every=1",
              *TINY, f"records_dir={tmp_path / 'rec'}", f"hydra.sweep.dir={tmp_path / 'multi'}"])
    assert p.returncode == 0, p.stderr[-2000:]
    recs = read_records(tmp_path / "rec")
    assert len(recs) == 4 and len({r["name"] for r in recs}) == 4
    assert len({r["config"]["checkpoint_dir"] for r in recs}) == 4
    by = {(r["config"]["model"]["depth"], r["config"]["optim"]["lr"]): r["status"] for r in recs}
    assert by == {(1, 1e-3): "ok", (2, 1e-3): "ok", (1, 1e30): "diverged", (2, 1e30): "diverged"}
    assert "4 jobs: 2 diverged, 2 ok" in p.stderr


def test_run_name_shows_every_override_the_base_name_does_not():
    a = identify(["method=abstraction_derived", "method.regions=[[l2,l4]]"], {})
    b = identify(["method=abstraction_derived", "method.regions=[[l3,l5]]"], {})
    assert a.suffix and b.suffix and a.suffix != b.suffix and "regions" in a.suffix
    # the budget and how a run is watched do not make another run: a longer run continues the same one
    assert identify(["trainer.epochs=3", "trainer.num_threads=1", "seed=2", "data.root=/x"], {}).suffix == ""
    assert identify(["run_name=mine", "data.subset=5"], {}).suffix == ""  # a name the user chose is kept


def test_only_an_experiment_at_its_own_settings_is_official():
    grid = {"method": "bp,fa,kp,wm,dtp", "model.depth": "1,2,3,4,5,6", "seed": 0}
    own = identify(["experiment=bpf_depth", "method=fa", "model.depth=3", "seed=0"], grid)
    assert own.official and own.suffix == ""
    for extra in (["data.subset=1000"], ["data.test_subset=200"], ["trainer.max_steps_per_epoch=5"],
                  ["trainer.epochs=1"], ["model.depth=7"], ["optim.lr=1e-2"], ["dataset=fmnist"]):
        ident = identify(["experiment=bpf_depth", "method=fa", "model.depth=3", *extra], grid)
        assert not ident.official, extra
    assert not identify(["method=fa"], {}).official  # no experiment at all


def test_a_sweep_written_in_exponent_notation_stays_official():
    """Hydra hands each job its swept value as it renders it (`1e-4` -> `0.0001`): that job is still the
    experiment at its own settings; a value outside the grid is not."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    grid = {"method.decay": "0.0,1e-4,3e-4,1e-3", "method": "kp"}
    (ov,) = OverridesParser.create().parse_overrides([f"method.decay={grid['method.decay']}"])
    jobs = [f"method.decay={v}" for v in ov.sweep_string_iterator()]  # as hydra's BasicSweeper builds them
    assert jobs[1] == "method.decay=0.0001"  # the rendering this test is about
    for job in jobs:
        ident = identify(["experiment=bpf_rules_tune_kp20", "method=kp", job], grid)
        assert ident.official and ident.suffix == "", (job, ident.why_not)
    assert not identify(["experiment=bpf_rules_tune_kp20", "method.decay=2e-4"], grid).official
    assert not identify(["experiment=bpf_rules_tune_kp20", "method=kpx"], grid).official


def test_every_experiment_sweep_gives_distinct_names():
    """An experiment's run_name shows every key its sweep varies (the name suffix leaves those out): from
    the grid's first point, changing any one swept key to any of its values changes the record's path."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for f in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
            sweeper = compose(config_name="config", overrides=[f"experiment={f.stem}"],
                              return_hydra_config=True).hydra.sweeper
            params = OmegaConf.to_container(sweeper.params) if sweeper.get("params") else {}
            grid = {k: [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}
            first = {k: v[0] for k, v in grid.items()}

            def path(point):
                c = compose(config_name="config", overrides=[f"experiment={f.stem}",
                                                            *(f"{k}={v}" for k, v in point.items())])
                return c.paper, c.table, c.run_name

            names = {path(first)}
            for k, values in grid.items():
                for v in values[1:]:
                    n = path({**first, k: v})
                    assert n not in names, f"{f.name}: {k}={v} does not change the record name {n}"
                    names.add(n)


# --- 2. committed records are never overwritten by another configuration -------------------------------

def test_adhoc_runs_leave_results_untouched(tmp_path):
    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "results"], cwd=ROOT,
                              capture_output=True, text=True).stdout
    before = status()
    p = _cli(["experiment=bpf_depth", "method=bp", "model.depth=1", *TINY, f"hydra.run.dir={tmp_path / 'out'}"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "record: runs/records/backprop-free-transformers/depth/" in p.stdout
    assert status() == before


def test_a_record_of_another_config_is_refused_before_training(compose_run, tmp_path):
    first = run(compose_run([*TINY, "run_name=cell"]))
    path = tmp_path / "records" / "adhoc" / "adhoc" / "cell.json"
    kept = path.read_bytes()
    t = time.perf_counter()
    with pytest.raises(RecordConflict, match=r"optim.lr: 0.0001 -> 0.003.*run_name"):
        run(compose_run([*TINY, "run_name=cell", "optim.lr=3e-3"]))
    assert time.perf_counter() - t < 5, "refused before any training"
    assert path.read_bytes() == kept
    # the same configuration with a longer budget is the same cell, trained longer: it replaces it
    longer = run(compose_run([*TINY[:2], "trainer.epochs=2", "trainer.progress=false", "run_name=cell"]))
    assert len(longer["metrics"]["per_epoch"]) == 2 != len(first["metrics"]["per_epoch"])


# --- 3-4. bad input: refused before data loads, naming the key, the value and what is allowed ----------

@pytest.mark.parametrize("override, names", [
    ("trainer.epochs=0", "trainer.epochs=0.*integer >= 1"),
    ("trainer.epochs=-1", "trainer.epochs=-1"),
    ("trainer.epochs=abc", "trainer.epochs='abc'"),
    ("trainer.epochs=1.5", "trainer.epochs=1.5"),
    ("trainer.batch_size=0", "trainer.batch_size=0"),
    ("data.subset=-5", "data.subset=-5"),
    ("optim.lr=abc", "optim.lr='abc'.*number > 0"),
    ("optim.lr=-1", "optim.lr=-1"),
    ("data.augment=flip", "data.augment='flip'.*jitter"),
    ("+trainer.epoch=1", "unknown setting trainer.epoch.*did you mean trainer.epochs"),
    ("+data.subsett=5", "did you mean data.subset"),
    ("+method.decay=0.1", "unknown setting method.decay for method=bp"),
    ("+model.widht=3", "did you mean model.width"),
    ("+optim.momentun=0.9", "unknown setting optim.momentun"),
    ("seed=-1", "seed=-1"),
])
def test_bad_settings_are_refused_by_name(compose_run, override, names):
    extra = ["model=mlp_depth"] if "widht" in override else []
    with pytest.raises(ConfigError, match=names):
        run(compose_run([*extra, override, "data.root=/nonexistent"]))  # refused before data is looked for


def test_bad_setting_on_the_command_line_is_one_line_and_nonzero(tmp_path):
    p = _cli(["trainer.batch_size=0", f"hydra.run.dir={tmp_path}"])
    assert p.returncode != 0 and "trainer.batch_size=0" in p.stderr and "Traceback" not in p.stderr


# --- 5. corrupt data names the file and the fix --------------------------------------------------------

def _mnist_copy(tmp_path) -> Path:
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = data_root() / "MNIST" / "raw"
    sums = []
    for f in sorted(src.iterdir()):
        (raw / f.name).write_bytes(f.read_bytes())
        from bpfree.data.verify import sha256
        sums.append(f"{sha256(raw / f.name)}  MNIST/raw/{f.name}")
    (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return root


def test_corrupt_dataset_files_name_the_file_and_the_fix(tmp_path):
    from bpfree.data import load_dataset
    from bpfree.data.verify import CorruptData
    from bpfree.data.vision import read_idx

    root = _mnist_copy(tmp_path)
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(good[:-100])  # truncated
    with pytest.raises(CorruptData, match=r"t10k-labels-idx1-ubyte is truncated.*10000.*bpfree.data verify"):
        read_idx(labels, 1)
    with pytest.raises(CorruptData, match=r"t10k-labels-idx1-ubyte is corrupt.*SHA256SUMS.*BPFREE_DATA"):
        load_dataset("mnist", root=str(root), cache_dir=str(tmp_path / "cache"))
    labels.write_bytes(b"\x00\x00\x09\x01" + good[4:])  # damaged header
    with pytest.raises(CorruptData, match="not an IDX file.*00000901"):
        read_idx(labels, 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "bpfree.data", "verify", "--root", str(root)], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert p.returncode == 1 and "CORRUPT  MNIST/raw/t10k-labels-idx1-ubyte" in p.stdout
    labels.write_bytes(good)
    s = load_dataset("mnist", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert len(s.train) == 60000 and (tmp_path / "cache" / "verified.json").is_file()  # hashed once


# --- 6. every rule's diagnostics at both ends of the model ---------------------------------------------

def _rules():
    from bpfree.registry import RULES
    return RULES.names()


@pytest.mark.parametrize("method", _rules())
def test_every_rules_diagnostics_work_at_both_ends_of_the_model(method):
    from omegaconf import OmegaConf

    from bpfree.build import build_rule_for, validate
    from bpfree.rules import UnsupportedModel
    from bpfree.tasks import Classification

    ends = [[]]
    c0 = OmegaConf.to_container(compose_cfg([f"method={method}"]), resolve=True)
    if "regions" in c0["method"]:
        ends = [["method.regions=[[l1,l3]]"], ["method.regions=[[l3,l5]]"]]
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    for extra in ends:
        c = OmegaConf.to_container(compose_cfg([f"method={method}", *extra]), resolve=True)
        validate(c)
        torch.manual_seed(0)
        try:
            rule = build_rule_for(c, (1, 28, 28), 10, Classification(10).loss, "cpu")
            opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
            out = rule.train_step(x, y, opt)
        except UnsupportedModel:
            continue  # e.g. M = I across unequal widths: refused by name, tested in its own file
        assert torch.isfinite(out["loss"])
        before = [p.detach().clone() for p in rule.parameters()]
        diag = rule.diagnostics(x, y)
        assert all(isinstance(v, float) for v in diag.values()), diag
        assert all(torch.equal(a, b) for a, b in zip(before, rule.parameters())), "diagnostics changed weights"


# --- 7. a sweep that trained nothing says so and fails -------------------------------------------------

def test_multirun_with_every_job_skipped_exits_nonzero_with_a_summary(tmp_path):
    p = _cli(["-m", "dataset=emnist,cifar100", f"data.root={tmp_path / 'nowhere'}",
              f"hydra.sweep.dir={tmp_path / 'multi'}", f"records_dir={tmp_path / 'rec'}"])
    assert p.returncode != 0
    assert "2 of 2 jobs skipped: dataset 'cifar100' not found; dataset 'emnist' not found" in p.stderr


# --- kill -9: what was written survives; a killed run resumes to the same record -----------------------

WRITER = """
import sys, json
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from bpfree.records import write_record
from bpfree.atomic import torch_save
from tests.test_tables import _rec
i = 0
while True:
    r = _rec(0, 0.5); r["metrics"]["per_epoch"] = [{{"epoch": j, "test_acc": 0.5}} for j in range(i % 2000)]
    write_record(r, Path({rec!r}))
    torch_save({{"i": i, "w": torch.randn(20000)}}, Path({ckpt!r}))
    i += 1
    if i == 3: print("ready", flush=True)
"""


def test_kill_while_writing_leaves_the_old_file_intact(tmp_path):
    rec, ckpt = tmp_path / "r.json", tmp_path / "last.pt"
    code = WRITER.format(root=str(ROOT), rec=str(rec), ckpt=str(ckpt))
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        json.loads(rec.read_text())  # a whole record, never half of one
        assert torch.load(ckpt)["w"].shape == (20000,)


def test_writers_of_one_file_never_share_a_temporary_and_a_failed_write_changes_nothing(tmp_path):
    """Processes sharing a folder (a data cache under a joblib sweep) may write one file at once: each
    writes its own temporary, the last rename wins whole, and an error mid-write leaves the old file."""
    from bpfree import atomic

    path = tmp_path / "cache" / "entry.json"
    with atomic.replacing(path) as a, atomic.replacing(path) as b:
        assert a != b and a.parent == b.parent == path.parent
        a.write_text("from a")
        b.write_text("from b")
    assert path.read_text() == "from a"  # the outer block renamed last
    with pytest.raises(ZeroDivisionError), atomic.replacing(path) as c:
        c.write_text("half")
        1 / 0
    assert path.read_text() == "from a"
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json"], "no temporary left behind"


def test_kill_9_in_epoch_2_then_resume_gives_the_same_record(compose_run, tmp_path):
    small = ["data.subset=3072", "data.test_subset=500", "trainer.progress=false", "optim.lr=1e-3",
             "trainer.epochs=3", "trainer.num_threads=1"]
    full = run(compose_run([*small, "run_name=full", f"checkpoint_dir={tmp_path / 'a'}"]))
    args = [*small, "run_name=killed", f"checkpoint_dir={tmp_path / 'b'}", f"records_dir={tmp_path / 'rec'}",
            f"hydra.run.dir={tmp_path / 'out'}", f"data.cache_dir={CACHE}"]
    env = {**os.environ, "BPFREE_DATA": str(data_root())}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/3"):
            break
    # somewhere inside epoch 2: it takes about as long as epoch 1 did (whatever the machine's load)
    took = float(line.split("epoch_train_seconds=")[1].split(",")[0])
    time.sleep(random.uniform(0.1, 0.7) * took)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    assert not (tmp_path / "rec").exists() or not list((tmp_path / "rec").rglob("*.json"))
    p = _cli([*args, "trainer.resume=true"])
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-1500:]
    (resumed,) = read_records(tmp_path / "rec")
    strip = lambda r: [{k: v for k, v in e.items() if "seconds" not in k} for e in r["metrics"]["per_epoch"]]  # noqa: E731
    assert resumed["timing"]["resumed_from_epoch"] in (1, 2) and strip(resumed) == strip(full)


# --- 10. checkpoints: no duplicate weights; deleted on request ---------------------------------------

def test_best_checkpoint_is_never_a_second_copy_of_last_and_resume_keeps_it(tmp_path):
    from bpfree.data import Splits, TensorData
    from bpfree.rules import build_rule
    from bpfree.models import build_model
    from bpfree.tasks import Classification
    from bpfree.train import fit

    class Selecting(Classification):
        select = ("test_loss", "min")

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 4, 4, generator=g), torch.randint(0, 3, (256,), generator=g)
    data = Splits("toy", TensorData(x, y), TensorData(x[:64], y[:64]))
    task = Selecting(3)
    seen = []

    def watch(entry):
        seen.append(((tmp_path / "ck" / "best.pt").exists(), entry["test_loss"]))

    def go(epochs, lr, resume=False):
        torch.manual_seed(0)
        rule = build_rule("bp", build_model("mlp", (1, 4, 4), 3, hidden=[8], activation="relu", init="default"),
                          task.loss)
        opt = torch.optim.SGD(rule.parameters(), lr=lr)
        return fit(rule, task, data, opt, epochs=epochs, batch_size=32, checkpoint_path=tmp_path / "ck",
                   resume=resume, progress=False, on_epoch=watch), rule

    go(4, 5.0)  # a large lr: the test loss goes up and down, so the best epoch is sometimes not the last
    best = []
    for i, (exists, loss) in enumerate(seen):
        best.append(loss if not best else min(best[-1], loss))
        assert exists == (loss > best[-1]), "best.pt exists exactly when the best epoch is not the last"
    res, rule = go(6, 5.0, resume=True)
    assert res.extras["selected_epoch"] == 1 + min(range(len(res.per_epoch)), key=lambda i: res.per_epoch[i]["test_loss"])


def test_keep_checkpoints_false_deletes_them_after_the_record(compose_run, tmp_path):
    run(compose_run([*TINY, "trainer.keep_checkpoints=false"]))
    assert not (tmp_path / "ckpt").exists()
    run(compose_run([*TINY, "seed=1"]))
    assert (tmp_path / "ckpt" / "last.pt").exists()


def test_scale_is_a_group_and_an_experiment_carries_its_budget_per_scale(compose_run):
    """conf/scale/{paper,cpu}: `scale=cpu` on an experiment with a `scales:` node picks its CPU budget, is
    still the experiment at its own settings (official), and the run name shows the scale; an unknown
    scale is refused listing the options; a scale the experiment has no budget for is refused by name."""
    from hydra.errors import MissingConfigException

    paper = compose_run(["experiment=bpf_rules_source_fa"])
    cpu = compose_run(["experiment=bpf_rules_source_fa", "scale=cpu"])
    assert (paper.scale, paper.trainer.epochs) == ("paper", 400)
    assert (cpu.scale, cpu.trainer.epochs, cpu.trainer.num_threads) == ("cpu", 10, 1)
    assert cpu.run_name == "fa-mlp-mnist-cpu-s0" and paper.run_name == "fa-mlp-mnist-paper-s0"
    assert identify(["experiment=bpf_rules_source_fa", "scale=cpu"], {"seed": "0,1,2"},
                    scales=tuple(cpu.scales)).official
    # a paper-only experiment at scale=cpu is ad hoc: nothing says what its CPU budget is
    assert not identify(["experiment=ag_table2", "scale=cpu"], {"seed": "0"}).official
    with pytest.raises(MissingConfigException, match="(?s)scale/gpu.*cpu.*paper"):
        compose_run(["scale=gpu"])
    with pytest.raises(ValueError, match="scale='cpu'.*paper only"):
        run(compose_run(["experiment=bpf_rules_source_fa", "scale=cpu", "~scales.cpu"]))


def test_a_setting_added_later_at_its_old_behaviour_keeps_checkpoints_resumable(compose_run):
    """trainer.staleness / trainer.dist_backend arrived after runs had checkpoints: a config without them
    fingerprints like one with them at the behaviour runs had before (so those runs resume), and any other
    value is a different configuration."""
    from omegaconf import OmegaConf

    from bpfree.records import config_fingerprint

    c = OmegaConf.to_container(compose_run(["experiment=al_table2_cpu"]), resolve=True)
    before = {**c, "trainer": {k: v for k, v in c["trainer"].items() if k not in ("staleness", "dist_backend")}}
    assert config_fingerprint(before) == config_fingerprint(c)
    assert config_fingerprint({**c, "trainer": {**c["trainer"], "staleness": 1}}) != config_fingerprint(c)
    assert config_fingerprint({**c, "trainer": {**c["trainer"], "dist_backend": "gloo"}}) != config_fingerprint(c)


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_zeroes_subnormal_arithmetic_and_keeps_a_run_resumable(compose_run, flush):
    """trainer.flush_denormal (default on) makes CPU arithmetic treat subnormals as 0 (saturated sigmoids
    emit them, and they made AL's CNN step ~6x slower); off, a subnormal survives a multiplication. It is
    how the CPU computes, not what is trained: a run started before the key existed resumes with it and
    keeps its name."""
    from omegaconf import OmegaConf

    from bpfree.build import build
    from bpfree.records import config_fingerprint

    cfg = compose_run(["data.subset=64", "data.test_subset=32", f"trainer.flush_denormal={flush}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    try:
        build(c)
        product = (torch.tensor([1e-39]) * torch.tensor([1.0])).item()  # 1e-39 is subnormal in float32
        assert (product == 0.0) == flush, product
    finally:
        torch.set_flush_denormal(False)  # process-wide: leave the other tests torch's default
    before = {**c, "trainer": {k: v for k, v in c["trainer"].items() if k != "flush_denormal"}}
    assert config_fingerprint(before) == config_fingerprint(c)
    assert identify(["experiment=al_table2_cpu", f"trainer.flush_denormal={flush}"], {}).official


def test_a_record_names_the_commit_its_process_started_from(tmp_path):
    """The commit is read when the code is imported: a checkout that moves on while a run trains (a merge
    mid-run) does not relabel the record with code that did not run."""
    import subprocess as sp

    repo = tmp_path / "repo"
    sp.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "bpfree").mkdir()
    (repo / "bpfree" / "records.py").write_text((ROOT / "bpfree" / "records.py").read_text())
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    sp.run(["git", "-C", str(repo), "add", "-A"], check=True)
    sp.run(["git", "-C", str(repo), "commit", "-qm", "a"], check=True, env=env)
    first = sp.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    code = ("import importlib.util, subprocess, sys, torch\n"
            f"spec = importlib.util.spec_from_file_location('r', {str(repo / 'bpfree' / 'records.py')!r})\n"
            "r = importlib.util.module_from_spec(spec); sys.modules['r'] = r; spec.loader.exec_module(r)\n"
            f"subprocess.run(['git', '-C', {str(repo)!r}, 'commit', '-q', '--allow-empty', '-m', 'b'], check=True)\n"
            "print(r.environment(torch.device('cpu'))['git_commit'])\n")
    out = sp.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    now = sp.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert now != first and out.stdout.strip() == first
