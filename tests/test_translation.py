"""Translation: data in its real formats, the seq2seq transformer, MT metrics, and abstraction on it."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from bpfree import mt_metrics as mt
from bpfree.data import DatasetUnavailable, load_dataset, length_batches
from bpfree.data.text import BOS, EOS, PAD
from bpfree.models import ablated, build_model
from bpfree.rules import build_rule
from bpfree.train import make_optimizer

DATA = Path(os.environ.get("BPFREE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
NLTK = str(DATA / "nltk_data")
need_multi30k = pytest.mark.skipif(not (DATA / "multi30k" / "train.de.gz").exists(), reason="no Multi30k copy")
need_wordnet = pytest.mark.skipif(not (DATA / "nltk_data" / "corpora" / "wordnet").exists(), reason="no WordNet")


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run beside training jobs on 2 shared cores: one intra-op thread is faster there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(layers=2, vocab=50, **kw):
    torch.manual_seed(0)
    return build_model("transformer", (2, 32), vocab, d_model=32, heads=4, ff=64, layers=layers, dropout=0.0, **kw)


def random_pairs(n=4, s=7, t=6, vocab=50):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, vocab, (n, s), generator=g)
    src[0, 4:] = PAD  # one padded source
    tgt = torch.randint(4, vocab, (n, t), generator=g)
    x = torch.zeros(n, 2, max(s, t + 1), dtype=torch.long)
    x[:, 0, :s] = src
    x[:, 1, 0] = BOS
    x[:, 1, 1 : t + 1] = tgt
    return x


# ----------------------------------------------------------------------------------------- metrics
# sacrebleu's README example: two reference streams, documented BLEU 48.53
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]


def test_sacrebleu_matches_its_documented_example():
    assert mt.sacrebleu_score(SYS, REFS) == pytest.approx(0.4853, abs=1e-4)


@need_wordnet
def test_perfect_hypothesis_scores_one():
    refs = ["A man in an orange hat starring at something.", "Two dogs run across a green field together."]
    assert mt.bleu(refs, refs) == pytest.approx(1.0)
    assert mt.sacrebleu_score(refs, refs) == pytest.approx(1.0)
    # nltk's METEOR keeps a fragmentation penalty 0.5 * (chunks / matches)^3 even for one chunk
    expect = sum(1 - 0.5 * (1 / len(mt.words(r))) ** 3 for r in refs) / len(refs)
    assert mt.meteor(refs, refs, NLTK) == pytest.approx(expect, abs=1e-9)
    assert expect > 0.999


@need_wordnet
def test_meteor_matches_nltk_documented_value():
    # nltk.translate.meteor_score.single_meteor_score docstring: hypothesis1 vs reference1 -> 0.6944
    hyp = "It is a guide to action which ensures that the military always obeys the commands of the party"
    ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    assert round(mt.meteor([hyp], [ref], NLTK), 4) == 0.6944


def test_tokenized_bleu_differs_from_sacrebleu_only_by_tokenisation():
    # a hypothesis that differs only in punctuation attachment: 13a and Treebank split it the same way
    # here, so the two BLEUs agree; a wrong word lowers both.
    hyp, ref = ["A dog runs on the grass ."], ["A dog runs on the grass."]
    assert mt.bleu(hyp, ref) == pytest.approx(1.0)
    assert mt.sacrebleu_score(hyp, ref) == pytest.approx(1.0)
    assert mt.bleu(["A cat runs on the grass."], ref) < 1.0


def test_comet_offline_hub_id_gives_none_with_reason_quickly():
    score, why = mt.comet(["a"], ["b"], ["c"], "Unbabel/wmt22-comet-da-not-cached-here")
    assert score is None and "unavailable" in why


def _tiny_comet_checkpoint(tmp: Path) -> Path:
    """A real COMET regression metric on a tiny, randomly initialised BERT encoder (tokenizer vocabulary
    written here), saved as unbabel-comet lays models out: <dir>/hparams.yaml + checkpoints/model.ckpt."""
    import yaml
    from comet.models import RegressionMetric
    from transformers import BertConfig, BertTokenizerFast

    enc = tmp / "encoder"
    enc.mkdir()
    words = "a b c the dog man cat runs bit on grass".split()
    (enc / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(enc / "vocab.txt")).save_pretrained(enc)
    BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=64).save_pretrained(enc)
    hp = dict(encoder_model="BERT", pretrained_model=str(enc), load_pretrained_weights=False,
              hidden_sizes=[8], layer="mix", pool="avg", dropout=0.0, activations="Tanh")
    torch.manual_seed(0)
    model = RegressionMetric(**hp)
    (tmp / "checkpoints").mkdir()
    ckpt = tmp / "checkpoints" / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.0.0"}, ckpt)
    (tmp / "hparams.yaml").write_text(yaml.safe_dump({**dict(model.hparams), "class_identifier": "regression_metric"}))
    return ckpt


def test_comet_scores_through_unbabel_loader(tmp_path):
    from comet import load_from_checkpoint

    ckpt = _tiny_comet_checkpoint(tmp_path)
    src, hyp, ref = ["a dog runs", "the cat"], ["a dog runs", "the man bit"], ["a dog runs", "the cat runs"]
    score, why = mt.comet(src, hyp, ref, str(tmp_path))  # a model folder resolves to its checkpoint
    assert why == "" and isinstance(score, float)
    direct = load_from_checkpoint(str(ckpt)).predict(
        [{"src": s, "mt": h, "ref": r} for s, h, r in zip(src, hyp, ref)], batch_size=2, gpus=0, progress_bar=False)
    assert score == pytest.approx(float(direct.system_score), abs=1e-6)


# -------------------------------------------------------------------------------------------- data
def _write_iwslt(root: Path, n_train=3):
    d = root / "iwslt2017" / "de-en"
    d.mkdir(parents=True)
    de = ["Hallo Welt.", "Das ist ein Test.", "Wir lernen Sprachen."][:n_train]
    en = ["Hello world.", "This is a test.", "We learn languages."][:n_train]
    for lang, lines in (("de", de), ("en", en)):
        (d / f"train.tags.de-en.{lang}").write_text(
            "<url>http://www.ted.com/talks/x</url>\n<keywords>talks</keywords>\n<speaker>X</speaker>\n"
            "<talkid>1</talkid>\n<title>T</title>\n<description>TED Talk</description>\n"
            + "\n".join(lines) + "\n", encoding="utf-8")
        for tag, seg in (("dev2010", "Guten Morgen." if lang == "de" else "Good morning."),
                         ("tst2010", "Danke schön." if lang == "de" else "Thank you.")):
            (d / f"IWSLT17.TED.{tag}.de-en.{lang}.xml").write_text(
                f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<srcset setid="iwslt2017-{tag}" srclang="{lang}">\n'
                f'<doc docid="1" genre="lectures">\n<url>http://x</url>\n<talkid>1</talkid>\n'
                f'<seg id="1"> {seg} </seg>\n</doc>\n</srcset>\n</mteval>\n', encoding="utf-8")
    return de, en


def test_iwslt17_reads_release_format(tmp_path):
    from bpfree.data.text import _iwslt_files, _iwslt_read

    de, en = _write_iwslt(tmp_path)
    files = _iwslt_files("de", "en")
    src, tgt = _iwslt_read([tmp_path / f for f in files["train"]])
    assert src == de and tgt == en  # metadata lines dropped, segments kept in order
    vs, vt = _iwslt_read([tmp_path / f for f in files["val"]])
    assert vs == ["Guten Morgen."] and vt == ["Good morning."]
    ts, tt = _iwslt_read([tmp_path / f for f in files["test"]])
    assert ts == ["Danke schön."] and tt == ["Thank you."]


def test_iwslt17_missing_gives_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailable, match="iwslt2017"):
        load_dataset("iwslt17", str(tmp_path), str(tmp_path / "cache"), src_lang="de", tgt_lang="en")


@need_multi30k
def test_multi30k_tensors_and_length_batches(tmp_path):
    d = load_dataset("multi30k", str(DATA), str(tmp_path), subset=300, src_lang="de", tgt_lang="en", vocab_size=300,
                     max_len=1000)
    assert d.task == "translation" and len(d.train) == 300 and len(d.val) == 1014 and len(d.test) == 1000
    x, y = d.train.x, d.train.y
    assert x.shape[1] == 2 and x.shape[2] == y.shape[1]
    assert (x[:, 1, 0] == BOS).all()
    # decoder input is the target shifted right by one: y[t] == x_tgt[t + 1] for every word piece
    real = (y != PAD) & (y != EOS)
    assert torch.equal(x[:, 1, 1:][real[:, :-1]], y[:, :-1][real[:, :-1]])
    assert ((y == EOS).sum(1) == 1).all() and (((x[:, 0] == EOS).sum(1)) == 1).all()
    seen = []
    for bx, by in length_batches(d.train, 32, shuffle=True, seed=3, epoch=1):
        lens = (bx != PAD).sum(-1).amax(1)
        assert bx.shape[-1] == int(lens.max()) == by.shape[1]  # trimmed to the longest pair
        seen.append(bx)
    assert sum(len(b) for b in seen) == 300
    again = [bx for bx, _ in length_batches(d.train, 32, shuffle=True, seed=3, epoch=1)]
    assert all(torch.equal(a, b) for a, b in zip(seen, again))  # order depends only on (seed, epoch)
    text = d.extras["test_ref"][0]
    from bpfree.tasks import Translation

    task = Translation(300, **d.extras, nltk_data=NLTK)
    ids = d.test.y[0][(d.test.y[0] != PAD) & (d.test.y[0] != EOS)]
    assert task.sp.decode(ids.tolist()) == text  # detokenising the reference's pieces restores it


# ------------------------------------------------------------------------------------------- model
def test_teacher_forced_logits_equal_cached_step_by_step():
    m = tiny().eval()
    x = random_pairs()
    full = m(x)  # (B, L, V)
    memory, keep = m.encode(x[:, 0])
    cache: dict = {}
    steps = [m.decode(x[:, 1, t : t + 1], memory, keep, cache, offset=t) for t in range(x.shape[-1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_greedy_follows_teacher_forced_argmax_and_beam1_is_greedy():
    m = tiny().eval()
    src = random_pairs()[:, 0]
    out = m.greedy(src, 8)
    # feeding greedy's own output back teacher-forced must reproduce each argmax
    prefix = torch.cat([torch.full((len(src), 1), BOS), out.masked_fill(out == PAD, EOS)], 1)[:, :-1]
    lp = m.decode(prefix, *m.encode(src))
    pred = lp.argmax(-1)
    real = out != PAD
    assert torch.equal(pred[real], out[real])
    assert torch.equal(m.beam(src, 1, 8), out)


def test_beam_finds_at_least_greedy_log_probability():
    m = tiny().eval()
    src = random_pairs()[:, 0]

    def logprob(seq):
        full = torch.cat([seq, torch.full((len(seq), 1), PAD)], 1)
        tgt = full.clone()
        first_pad = (tgt == PAD).int().argmax(1)
        tgt[torch.arange(len(tgt)), first_pad] = EOS  # the EOS _strip removed
        inp = torch.cat([torch.full((len(seq), 1), BOS), tgt[:, :-1]], 1)
        lp = m.decode(inp, *m.encode(src)).gather(-1, tgt[..., None]).squeeze(-1)
        keep = (tgt.cumsum(1) >= 0) & ((tgt == EOS).int().cumsum(1) - (tgt == EOS).int() == 0)
        return (lp * keep).sum(1)

    g, b = m.greedy(src, 6), m.beam(src, 4, 6, length_penalty=0.0)
    finished = ((g == PAD).any(1)) & ((b == PAD).any(1))  # compare sentences both ended with EOS
    assert (logprob(b)[finished] >= logprob(g)[finished] - 1e-4).all()


def test_blocks_are_named_and_attention_is_plain_linear():
    m = tiny(layers=3)
    assert list(m.blocks) == ["E1", "E2", "E3", "D1", "D2", "D3"]
    att = m.blocks["D2"].cross
    assert all(type(getattr(att, n)) is torch.nn.Linear for n in "qkvo")


def test_ablation_removes_exactly_the_named_layers():
    m = tiny(layers=3).eval()
    x = random_pairs()
    smaller = copy.deepcopy(m)
    del smaller.blocks["E2"], smaller.blocks["E3"], smaller.blocks["D1"]
    calls = []
    for n, b in m.blocks.items():
        b.register_forward_hook(lambda mod, a, o, n=n: calls.append(n))
    with ablated(m, [["E2", "E3"], ["D1", "D1"]]) as names:
        assert names == ["E2", "E3", "D1"]
        out = m(x)
    assert torch.allclose(out, smaller(x), atol=1e-6)
    assert [c for c in calls if c not in ("E2", "E3", "D1")] == ["E1", "D2", "D3"]
    calls.clear()
    m(x)  # restored
    assert calls == ["E1", "E2", "E3", "D1", "D2", "D3"]


def test_decoding_with_decoder_layers_removed_equals_the_smaller_model():
    # Table 6 scores D234/D345 after ablation: greedy and beam decoding must run with the cache of a
    # removed decoder layer left empty, and decode exactly what a model without those layers decodes
    m = tiny(layers=3).eval()
    src = random_pairs()[:, 0]
    smaller = copy.deepcopy(m)
    del smaller.blocks["D2"], smaller.blocks["D3"]
    with ablated(m, [["D2", "D3"]]):
        assert torch.equal(m.greedy(src, 12), smaller.greedy(src, 12))
        assert torch.equal(m.beam(src, 3, 12), smaller.beam(src, 3, 12))


def test_identity_abstraction_passes_G_i_unchanged_on_a_transformer_region():
    from bpfree.tasks import Translation

    m = tiny(layers=3)
    task = Translation.__new__(Translation)
    task.ls = 0.1
    build_rule("abstraction_identity", m, task.loss, regions=[["E2", "E3"]])
    x = random_pairs()
    y = torch.cat([x[:, 1, 1:], torch.full((len(x), 1), EOS)], 1)
    grabbed = {}
    m.blocks["E1"].register_forward_hook(lambda mod, a, o: grabbed.__setitem__("h1", o))
    m.blocks["E3"].register_forward_hook(lambda mod, a, o: grabbed.__setitem__("h3", o))
    loss = task.loss(m(x), y)
    g1, g3 = torch.autograd.grad(loss, [grabbed["h1"], grabbed["h3"]], retain_graph=True)
    assert g3.abs().sum() > 0
    assert torch.equal(g1, g3)  # G_j = G_i M with M = I: the region's gradient skips E2-E3 intact
    # while plain backprop through E2-E3 would have changed it
    m2 = tiny(layers=3)
    m2.load_state_dict(m.state_dict())
    h = {}
    m2.blocks["E1"].register_forward_hook(lambda mod, a, o: h.__setitem__("h1", o))
    m2.blocks["E3"].register_forward_hook(lambda mod, a, o: h.__setitem__("h3", o))
    t1, t3 = torch.autograd.grad(task.loss(m2(x), y), [h["h1"], h["h3"]])
    assert torch.allclose(t3, g3) and not torch.allclose(t1, g1)


def test_noam_schedule_peaks_at_warmup():
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt, sched, interval = make_optimizer(p, "adam", lr=2.0, scheduler={"name": "noam", "d_model": 512,
                                                                          "warmup": 100, "interval": "step"})
    assert interval == "step"
    lrs = []
    for _ in range(300):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(range(300), key=lrs.__getitem__) == 99  # step 100 (1-based) is the peak
    assert lrs[99] == pytest.approx(2.0 * 512 ** -0.5 * 100 ** -0.5)


@need_multi30k
@need_wordnet
def test_tiny_transformer_overfits_32_pairs(tmp_path):
    """32 real Multi30k pairs, memorised within a minute on CPU: greedy decoding reproduces them."""
    from bpfree.tasks import Translation

    torch.manual_seed(0)
    d = load_dataset("multi30k", str(DATA), str(tmp_path), subset=32, src_lang="de", tgt_lang="en", vocab_size=200)
    train = d.train
    task = Translation(200, tokenizer=d.extras["tokenizer"], test_src=[], test_ref=[], vocab_size=200,
                       label_smoothing=0.0, beam_size=1, nltk_data=NLTK)
    m = build_model("transformer", (2, 64), 200, d_model=64, heads=4, ff=128, layers=2, dropout=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(90):  # ~75 steps reach BLEU 1.0 at this size (one thread: ~12 s)
        for x, y in length_batches(train, 32, shuffle=False):
            opt.zero_grad()
            loss = task.loss(m(x), y)
            loss.backward()
            opt.step()
    m.eval()
    from bpfree.rules import build_rule

    hyps = task.translate(build_rule("bp", m, task.loss), train.x[:, 0])  # decoded through rule.decode
    refs = task.sp.decode([r[(r != PAD) & (r != EOS)].tolist() for r in train.y])
    assert mt.sacrebleu_score(hyps, refs) > 0.95
    assert mt.bleu(hyps, refs) > 0.95


def test_run_translation_end_to_end(tmp_path):
    """`python run.py method=abstraction_identity model=transformer` at toy size: trains, picks the
    lowest-validation-loss epoch and scores it (BLEU/SacreBLEU/METEOR; COMET n/a offline), ablated too."""
    if not (DATA / "multi30k" / "train.de.gz").exists():
        pytest.skip("no Multi30k copy")
    from hydra import compose, initialize_config_dir

    import run as entry

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=[
            "method=abstraction_identity", "model=transformer", f"data.root={DATA}", f"data.cache_dir={tmp_path}",
            "data.subset=256", "data.test_subset=16", "dataset.vocab_size=300", "dataset.eval.beam_size=2",
            "dataset.eval.ablate=[[E4,E6]]", f"dataset.eval.nltk_data={NLTK}",
            "model.d_model=32", "model.heads=2", "model.ff=64", "trainer.epochs=2", "trainer.batch_size=64",
            "trainer.max_steps_per_epoch=2", "trainer.progress=false", "trainer.probe_size=8", "trainer.num_threads=1",
            f"records_dir={tmp_path}/rec", f"checkpoint_dir={tmp_path}/ck",
        ])
    rec = entry.run(cfg)
    fin = rec["metrics"]["final"]
    for k in ("bleu", "sacrebleu", "meteor", "bleu_ablated", "meteor_ablated"):
        assert 0.0 <= fin[k] <= 1.0
    assert fin["comet"] is None or isinstance(fin["comet"], float)
    per = rec["metrics"]["per_epoch"]
    assert rec["metrics"]["selected"]["selected_epoch"] == 1 + min(range(len(per)), key=lambda i: per[i]["val_loss"])
    assert rec["config"]["method"]["regions"] == [["E4", "E6"]]


def test_transformer_config_builds_and_emits_log_probabilities():
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=transformer", "model.d_model=32", "model.heads=2", "model.ff=64"])
    assert cfg.dataset.name == "multi30k"  # choosing the model selects its dataset
    kw = {k: v for k, v in cfg.model.items() if k != "name"}
    m = build_model("transformer", cfg.dataset.input_shape, cfg.dataset.num_classes, **kw).eval()
    out = m(random_pairs(vocab=cfg.dataset.num_classes))
    assert out.shape[-1] == cfg.dataset.num_classes
    assert torch.allclose(out.exp().sum(-1), torch.ones(out.shape[:2]), atol=1e-4)


def test_derived_M_on_a_transformer_region_is_least_squares_over_all_token_positions():
    """G_j = G_i M with M the least-squares map over every (sentence, position) row of the batch:
    4 sentences x 7 source positions = 28 rows > 16 + 1 unknowns, so the solution is unique."""
    from bpfree.tasks import Translation

    torch.manual_seed(0)
    m = build_model("transformer", (2, 32), 50, d_model=16, heads=4, ff=32, layers=3, dropout=0.0)
    task = Translation.__new__(Translation)
    task.ls = 0.0
    build_rule("abstraction_derived", m, task.loss, regions=[["E2", "E3"]])
    x = random_pairs(s=7, t=6)
    y = torch.cat([x[:, 1, 1:], torch.full((len(x), 1), EOS)], 1)
    h = {}
    m.blocks["E1"].register_forward_hook(lambda mod, a, o: h.__setitem__("in", o))
    m.blocks["E3"].register_forward_hook(lambda mod, a, o: h.__setitem__("out", o))
    g_in, g_out = torch.autograd.grad(task.loss(m(x), y), [h["in"], h["out"]])
    hin = h["in"].detach().reshape(-1, 16).double()
    hout = h["out"].detach().reshape(-1, 16).double()
    a = torch.linalg.lstsq(torch.cat([hin, torch.ones(len(hin), 1, dtype=torch.double)], 1), hout).solution  # (17, 16)
    expect = (g_out.reshape(-1, 16).double() @ a[:16].T).reshape(g_in.shape)
    assert torch.allclose(g_in.double(), expect, rtol=1e-3, atol=1e-7)
