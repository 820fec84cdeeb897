"""The rule card counts each seed once: a 5-epoch and a 20-epoch record of the same rule and seed (the
rules_tuned budget was raised and the first records stay committed) give one run, the longer."""
import importlib.util
import shutil

from conftest import ROOT

BPF = ROOT / "results" / "records" / "backprop-free-transformers"


def _card_module():
    path = ROOT / "experiments" / "backprop-free-transformers" / "rule_card.py"
    spec = importlib.util.spec_from_file_location("rule_card", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_longer_run_of_the_same_seed_replaces_the_shorter_one(tmp_path, monkeypatch):
    for table in ("rules_tuned", "mnist_rules"):
        (tmp_path / table).mkdir()
    for name in ("bp-mlp-mnist-cpu-e5-s0.json", "bp-mlp-mnist-cpu-e20-s0.json"):
        shutil.copy(BPF / "rules_tuned" / name, tmp_path / "rules_tuned" / name)
    mod = _card_module()
    monkeypatch.chdir(ROOT)  # reference.yaml, tables.yaml and the rules_tune records are read from the repo
    monkeypatch.setattr(mod, "REC", tmp_path)
    bp = next(line for line in mod.card().splitlines() if line.startswith("| bp |"))
    assert "n=1," in bp and "20 epochs" in bp, bp


def test_kp_is_carded_at_the_decay_chosen_at_the_tables_budget(tmp_path, monkeypatch):
    """kp's row in rules_tuned keeps the decay chosen at 1 epoch; the card shows kp at its best, the
    kp_decay0.0 row (its decay chosen on validation at 20 epochs), and says which decay."""
    for table in ("rules_tuned", "mnist_rules"):
        (tmp_path / table).mkdir()
    for name in ("kp-mlp-mnist-cpu-e20-s0.json", "kp-decay0.0-mlp-mnist-cpu-e20-s0.json"):
        shutil.copy(BPF / "rules_tuned" / name, tmp_path / "rules_tuned" / name)
    mod = _card_module()
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(mod, "REC", tmp_path)
    kp = next(line for line in mod.card().splitlines() if line.startswith("| kp |"))
    assert "decay 0/step" in kp and "n=1," in kp, kp
