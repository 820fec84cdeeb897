"""The BERT-style encoder classifier (backprop-free-transformers §7), every rule on it, DFA on
(N, T, d) streams, and the NLI loaders (MNLI in its two file layouts, RTE). Tiny sizes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bpfree.data.nli import MNLI_LABELS, MalformedRow, load_nli, read_rte
from bpfree.data.text import PAD
from bpfree.models import build_model
from bpfree.records import validate
from bpfree.rules import build_rule
from run import run
from tests.conftest import compose_cfg, data_root

VOCAB, L, CLASSES = 40, 10, 3
MAX_LEN = 16  # the model's positions (dataset.max_len); batches are L <= MAX_LEN wide


def tiny(layers=2, pool="cls", patch=None, dropout=0.0):
    shape = (1, 28, 28) if patch else (2, MAX_LEN)
    return build_model("encoder", shape, CLASSES, d_model=16, heads=2, ff=32, layers=layers, dropout=dropout,
                       pool=pool, patch=patch, vocab_size=VOCAB, segments=2, init_std=0.02)


def token_batch(n=8, seed=0):
    """(n, 2, L) ids + segments with sequences of different lengths (PAD after), and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 2, L, dtype=torch.long)
    for i in range(n):
        k = 4 + i % (L - 4)  # real length
        x[i, 0, :k] = torch.randint(4, VOCAB, (k,), generator=g)
        x[i, 1, k // 2:k] = 1
    return x, torch.arange(n) % CLASSES


RULES = {  # rule -> constructor kwargs (the conf/method values; dfa both placements)
    "bp": {}, "fa": {}, "usf": {}, "kp": {"decay": 1e-3}, "wm": {},
    "dfa_layer": {"placement": "layer"}, "dfa_block": {"placement": "block"},
    "dtp_chain": {"target_lr": 0.1, "noise": 0.1, "inverse_lr": None},
    "lra_chain": {"beta": 0.1, "error_std": None, "derivative": True},
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_trains_a_tiny_batch_to_lower_loss(name):
    torch.manual_seed(0)
    model = tiny()
    rule = build_rule(name.split("_layer")[0].split("_block")[0], model, F.nll_loss, **RULES[name])
    x, y = token_batch()
    opt = torch.optim.Adam(rule.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(F.nll_loss(model(x), y))
    for _ in range(40):
        out = rule.train_step(x, y, opt)
        assert torch.isfinite(out["loss"])
    with torch.no_grad():
        after = float(F.nll_loss(model(x), y))
    assert after < before - 0.05, (before, after)
    diag = rule.diagnostics(x, y)  # per-projection alignment keys (bp has nothing to align), finite
    assert name == "bp" or ("angle_grad/L1.attn.q" in diag and "angle_grad/L2.wo" in diag)
    assert all(v == v for v in diag.values())


def test_fa_with_B_equal_W_matches_backprop_on_the_encoder():
    torch.manual_seed(1)
    model = tiny(layers=2, pool="mean")
    ref = copy.deepcopy(model)
    rule = build_rule("fa", model, F.nll_loss)
    for layer in rule.layers.values():
        layer.feedback.data.copy_(layer.weight)
    x, y = token_batch()
    F.nll_loss(model(x), y).backward()
    F.nll_loss(ref(x), y).backward()
    mine, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    assert set(mine) == set(theirs)
    for n, p in mine.items():
        assert torch.allclose(p.grad, theirs[n].grad, rtol=1e-5, atol=1e-8), n


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_tokens_do_not_change_a_sequences_logits(pool):
    torch.manual_seed(2)
    model = tiny(pool=pool).eval()
    x, _ = token_batch()
    wide = torch.cat([x, torch.zeros(len(x), 2, MAX_LEN - L, dtype=torch.long)], 2)  # more PAD columns
    alone = [model(x[i:i + 1, :, : int((x[i, 0] != PAD).sum())]) for i in range(len(x))]  # no padding at all
    with torch.no_grad():
        a, b = model(x), model(wide)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a, torch.cat(alone), atol=1e-6)
    assert not torch.allclose(a[0], a[1])  # the check can fail: different sequences differ


def test_patch_input_reads_mnist_shaped_images_as_17_tokens():
    model = tiny(patch=7)
    x = torch.randn(3, 1, 28, 28)
    z = model.blocks["emb"](x)
    assert z.shape == (3, 17, 16)
    x2 = x.clone()
    x2[:, :, :7, :7] += 1.0  # only the first patch changes: only token 1 ([CLS] is token 0) changes
    z2 = model.blocks["emb"](x2)
    changed = (z2 - z).abs().amax(-1).amax(0) > 1e-6
    assert changed.tolist() == [False, True] + [False] * 15


def test_dfa_sends_the_error_to_every_real_token_of_a_sequence_stream():
    """layer placement: a Linear on (N, T, d) receives e B_l at every real position, 0 at padding."""
    torch.manual_seed(3)
    model = tiny(layers=1)
    _rule = build_rule("dfa", model, F.nll_loss, placement="layer")  # kept alive: its hooks do the work
    x, y = token_batch(4)
    seen = {}
    wi = model.blocks["L1"].wi
    wi.register_full_backward_hook(lambda m, gin, gout: seen.update(gin=gin[0]))
    model.blocks["head"].out.register_full_backward_hook(lambda m, gin, gout: seen.update(e=gout[0]))
    F.nll_loss(model(x), y).backward()
    B = wi.proj.matrix(CLASSES, 16, seen["e"])  # (classes, d)
    real = (x[:, 0] != PAD)[..., None].float()
    want = (seen["e"] @ B)[:, None, :] * real
    assert seen["gin"].shape == (4, L, 16)
    assert torch.allclose(seen["gin"], want, atol=1e-7)
    assert (seen["gin"][~(x[:, 0] != PAD)] == 0).all() and seen["gin"].abs().sum() > 0


def test_dfa_block_placement_replaces_each_layer_output_gradient():
    """block placement (Launay et al. 2020 macro): L1 is trained by backprop from e B_L1 at its
    output (every real token), not from the gradient L2 sends down; the head's gradient stays exact."""
    torch.manual_seed(4)
    model = tiny(layers=2)
    ref = copy.deepcopy(model)
    rule = build_rule("dfa", model, F.nll_loss, placement="block")
    x, y = token_batch(4)
    F.nll_loss(model(x), y).backward()
    F.nll_loss(ref(x), y).backward()
    got = model.blocks["L1"].wo.weight.grad.clone()
    e = rule.hub.e  # (N, classes): dL/dlogits, recorded at the head's Linear
    real = (x[:, 0] != PAD)[..., None].float()
    want = (e @ rule.block_proj["L1"].matrix(CLASSES, 16, e))[:, None, :] * real  # (N, T, d)
    blk = ref.blocks["L1"]  # the same weights, plain autograd: backprop `want` through L1 alone
    blk.zero_grad()
    blk(ref.blocks["emb"](x).detach(), (x[:, 0] != PAD)[:, None, None, :]).backward(want)
    assert torch.allclose(got, blk.wo.weight.grad, atol=1e-7)
    bp = copy.deepcopy(ref)
    bp.zero_grad()
    F.nll_loss(bp(x), y).backward()
    assert not torch.allclose(got, bp.blocks["L1"].wo.weight.grad, atol=1e-4)  # it is not backprop's
    assert torch.allclose(model.blocks["head"].out.weight.grad, bp.blocks["head"].out.weight.grad, atol=1e-7)


# ---------------------------------------------------------------- MNLI files in their two real layouts
PAIRS = {
    "train": [("A man is playing a guitar.", "A person plays music.", "entailment"),
              ("The cat sleeps on the sofa.", "The cat is running.", "contradiction"),
              ("Two kids walk to school.", "The kids are late.", "neutral"),
              ("She said \"hello\" twice.", "She spoke.", "entailment"),
              ("Prices rose in May.", "Prices fell in May.", "contradiction")],
    "dev_matched": [("A dog barks loudly.", "An animal makes noise.", "entailment"),
                    ("He reads a book.", "He is asleep.", "contradiction")],
    "dev_mismatched": [("The train left early.", "The train was on time.", "neutral")],
}
TRAIN_COLS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
DEV_COLS = TRAIN_COLS[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
PARQUET = {"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched", "train": "train"}


def write_tsv(root, bad_line: int | None = None):
    (root / "MNLI").mkdir(parents=True)
    for split, rows in PAIRS.items():
        cols = TRAIN_COLS if split == "train" else DEV_COLS
        lines = ["\t".join(cols)]
        for i, (a, b, lab) in enumerate(rows):
            rec = {c: "x" for c in cols} | {"index": str(i), "sentence1": a, "sentence2": b,
                                            "gold_label": lab, "genre": "fiction"}
            lines.append("\t".join(rec[c] for c in cols))
        if split == "train" and bad_line is not None:
            lines[bad_line - 1] += "\textra"
        (root / "MNLI" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_parquet(root, bad_row: int | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "glue" / "mnli").mkdir(parents=True)
    for split, rows in PAIRS.items():
        labels = [MNLI_LABELS[r[2]] for r in rows]
        if split == "train" and bad_row is not None:
            labels[bad_row] = 7
        table = pa.table({"premise": [r[0] for r in rows], "hypothesis": [r[1] for r in rows],
                          "label": pa.array(labels, pa.int64()), "idx": list(range(len(rows)))})
        pq.write_table(table, root / "glue" / "mnli" / f"{PARQUET[split]}-00000-of-00001.parquet")


NLI_KW = dict(vocab_size=60, tokenizer="unigram", max_len=16)


def test_mnli_loader_reads_tsv_and_parquet_into_identical_tensors(tmp_path):
    write_tsv(tmp_path / "a")
    write_parquet(tmp_path / "b")
    cache = tmp_path / "cache"
    a = load_nli("mnli", tmp_path / "a", cache, layout="tsv", **NLI_KW)
    b = load_nli("mnli", tmp_path / "b", cache, layout="parquet", **NLI_KW)
    auto = load_nli("mnli", tmp_path / "b", cache, layout="auto", **NLI_KW)
    for split in ("train", "test", "val"):
        ta, tb, tc = getattr(a, split), getattr(b, split), getattr(auto, split)
        assert torch.equal(ta.x, tb.x) and torch.equal(ta.y, tb.y) and torch.equal(tb.x, tc.x), split
    assert a.train.y.tolist() == [0, 2, 1, 0, 2] and a.test.y.tolist() == [0, 2] and a.val.y.tolist() == [1]
    x = a.train.x[3]  # [CLS] premise [SEP] hypothesis [SEP]; the quotes survive (no CSV quoting in GLUE TSV)
    ids, seg = x[0][x[0] != PAD], x[1][x[0] != PAD]
    assert ids[0] == 2 and ids[-1] == 3 and (ids == 3).sum() == 2
    first_sep = int((ids == 3).nonzero()[0])
    assert (seg[: first_sep + 1] == 0).all() and (seg[first_sep + 1:] == 1).all()
    assert (a.train.x[:, 0] != PAD).sum(1).max() <= NLI_KW["max_len"]


def test_a_malformed_tsv_row_names_the_file_and_line(tmp_path):
    write_tsv(tmp_path, bad_line=4)  # line 1 is the header
    with pytest.raises(MalformedRow, match=r"MNLI/train\.tsv:4: 13 tab-separated fields"):
        load_nli("mnli", tmp_path, tmp_path / "cache", layout="tsv", **NLI_KW)


def test_a_bad_label_names_the_file_and_line(tmp_path):
    write_tsv(tmp_path)
    p = tmp_path / "MNLI" / "dev_matched.tsv"
    p.write_text(p.read_text().replace("contradiction", "contradicts"))
    with pytest.raises(MalformedRow, match=r"dev_matched\.tsv:3: gold_label 'contradicts'"):
        load_nli("mnli", tmp_path, tmp_path / "cache", layout="tsv", **NLI_KW)


def test_a_malformed_parquet_row_names_the_file_and_row(tmp_path):
    write_parquet(tmp_path, bad_row=2)
    with pytest.raises(MalformedRow, match=r"train-00000-of-00001\.parquet: row 2: .*label=7"):
        load_nli("mnli", tmp_path, tmp_path / "cache", layout="parquet", **NLI_KW)


def test_mnli_paper_experiment_runs_on_small_files_in_the_real_format(tmp_path):
    """conf/experiment/bpf_encoder_mnli.yaml end to end (tiny model, 2 steps) on GLUE-format files."""
    write_tsv(tmp_path / "data")
    cfg = compose_cfg(["experiment=bpf_encoder_mnli", "method=kp", "model.layers=1", "model.d_model=16",
                       "model.heads=2", "model.ff=32", "dataset.vocab_size=60", "trainer.epochs=1",
                       "trainer.probe_size=2", "trainer.eval_batch_size=4"], tmp_path)
    cfg.data.root = str(tmp_path / "data")
    cfg.data.cache_dir = str(tmp_path / "cache")
    rec = validate(run(cfg))
    assert rec["status"] == "ok" and rec["dataset"] == "mnli" and rec["scale"] == "paper"
    ep = rec["metrics"]["per_epoch"][0]
    assert 0 <= ep["test_acc"] <= 1 and "val_acc" in ep  # dev-matched and dev-mismatched


def test_method_model_files_select_the_encoder_variants(tmp_path):
    for method, name in (("dtp", "dtp_chain"), ("lra", "lra_chain"), ("dfa", "dfa")):
        cfg = compose_cfg([f"method={method}", "model=encoder_patches"], tmp_path)
        assert cfg.method.name == name and cfg.row == method
    assert compose_cfg(["method=dfa", "model=encoder"], tmp_path).method.placement == "block"
    assert compose_cfg(["method=dfa", "model=mlp"], tmp_path).method.placement == "layer"


def test_rte_reads_the_three_pascal_challenges():
    rows = read_rte(data_root())
    assert len(rows["train"][0]) == 567 + 800 + 400 + 800 + 800 and len(rows["test"][0]) == 800
    assert set(rows["train"][2]) == {0, 1} and abs(sum(rows["test"][2]) / 800 - 390 / 800) < 1e-9
    assert all(p and h for p, h in zip(rows["test"][0], rows["test"][1]))
