"""Tests for eval.py: every scorer on hand-made answers, the paper's table averages, and
end-to-end runs of `eval.py --preset tiny` over synthetic copies of each benchmark's format
(resume, torchrun sharding, WiSE-FT, the comparison table)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models; threads only fight the other test processes

import carpe  # noqa: E402
import eval as E  # noqa: E402
import benchmarks as B  # noqa: E402
import common  # noqa: E402
import tiny  # noqa: E402


# -----------------------------------------------------------------------------
# scorers on hand-made predictions

def test_classification_substring_and_exact():
    recs = [dict(label="Golden Retriever", answer="This is a golden retriever."),
            dict(label="cat", answer="A dog"),
            dict(label="tench", answer="Tench.")]
    sub = B.score_classification(recs, "substring")
    assert sub["correct"] == 3 - 1 and math.isclose(sub["headline"], 200 / 3)
    exact = B.score_classification(recs, "exact")
    assert exact["correct"] == 1  # only "Tench." equals its label once the trailing period goes


def test_sqa_letter_parser():
    assert B.parse_sqa_letter("B", 3) == "B"
    assert B.parse_sqa_letter("C. a magnet", 3) == "C"
    assert B.parse_sqa_letter("Looking at it, the answer is A.", 3) is None  # LLaVA wants "The answer is"
    assert B.parse_sqa_letter("Looking at it. The answer is A.", 3) == "A"
    assert B.parse_sqa_letter("D", 3) is None  # not an option of a 3-option question
    assert B.parse_sqa_letter("b", 3) is None
    recs = [dict(answer="The answer is B.", gt="B", n_options=2), dict(answer="A", gt="B", n_options=2)]
    assert B.score_sqa(recs)["headline"] == 50.0


def test_textvqa_normalisation_and_soft_accuracy():
    assert B.normalize_vqa_answer("Two") == B.normalize_vqa_answer("2") == "2"
    assert B.normalize_vqa_answer("The Apple.") == "apple"
    assert B.normalize_vqa_answer("an apple!") == "apple"
    assert B.normalize_vqa_answer("coca-cola") == "coca cola"
    assert B.normalize_vqa_answer("dont") == "don't"
    assert B.normalize_vqa_answer("3.5") == "3.5"  # decimal point kept
    gts = ["2"] * 3 + ["3"] * 7
    # leave-one-out: 3 subsets keep 2 matches (2/3), 7 keep 3 (1.0)
    assert math.isclose(B.vqa_soft_accuracy("two", gts), (3 * 2 / 3 + 7) / 10)
    assert math.isclose(B.vqa_soft_accuracy("2", ["2"] + ["x"] * 9), 9 * (1 / 3) / 10)
    assert B.vqa_soft_accuracy("the 3", gts) == 1.0
    assert B.vqa_soft_accuracy("four", gts) == 0.0


def test_pope_parser_and_f1():
    assert B.parse_pope_yes_no("No, there is no dog.") == "no"
    assert B.parse_pope_yes_no("There is not a dog in the image.") == "no"
    assert B.parse_pope_yes_no("Yes. There is no other animal.") == "yes"  # only the first sentence counts
    assert B.parse_pope_yes_no("Nothing like that") == "yes"  # "Nothing" is not the word "no"
    assert B.parse_pope_yes_no("yes") == "yes"
    recs = []
    # adversarial: tp=1 fp=1 fn=0 tn=0 -> P=.5 R=1 F1=2/3; popular: all right -> F1=1; random: tp=0 -> F1=0
    for split, pairs in dict(adversarial=[("Yes", "yes"), ("Yes", "no")], popular=[("Yes", "yes"), ("No", "no")],
                             random=[("No", "yes"), ("No", "no")]).items():
        recs += [dict(split=split, answer=a, label=l) for a, l in pairs]
    s = B.score_pope(recs)
    assert math.isclose(s["headline"], 100 * (2 / 3 + 1 + 0) / 3)
    assert math.isclose(s["splits"]["adversarial"]["yes_ratio"], 100.0)
    assert math.isclose(s["accuracy"], 100 * (0.5 + 1 + 0.5) / 3)


def test_mme_pairs_and_totals():
    assert B.parse_mme_yes_no("Yes, it is.") == "yes"
    assert B.parse_mme_yes_no("No") == "no"
    assert B.parse_mme_yes_no("There is a dog") == "other"
    recs = []
    # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50 -> 125
    recs += [dict(subtask="existence", image="e/1", gt="yes", answer="Yes"), dict(subtask="existence", image="e/1", gt="no", answer="no"),
             dict(subtask="existence", image="e/2", gt="yes", answer="yes"), dict(subtask="existence", image="e/2", gt="no", answer="yes")]
    # code_reasoning (cognition): one image, both right -> 200
    recs += [dict(subtask="code_reasoning", image="c/1", gt="yes", answer="yes"),
             dict(subtask="code_reasoning", image="c/1", gt="no", answer="No.")]
    s = B.score_mme(recs)
    assert s["subtasks"]["existence"] == dict(score=125.0, acc=75.0, acc_plus=50.0, total=4)
    assert s["perception"] == 125.0 and s["cognition"] == 200.0 and s["headline"] == 325.0


def test_choice_extraction_rules():
    opts = dict(A="dog", B="cat", C="red fox")
    assert B.extract_choice("B", opts) == "B"
    assert B.extract_choice("(c)", opts) == "C"
    assert B.extract_choice("C. red fox", opts) == "C"
    assert B.extract_choice("The answer is B.", opts) == "B"
    assert B.extract_choice("A cat sits on the mat.", opts) == "B"  # article "A", then the option text
    assert B.extract_choice("I see a red fox", opts) == "C"
    assert B.extract_choice("a dog and a cat", opts) is None  # two option texts: no answer
    assert B.extract_choice("E", opts) is None


def test_mmbench_circular():
    opts = lambda *t: dict(zip("ABC", t))
    recs = [  # question 0: all rotations right; question 1: one rotation wrong
        dict(group=0, gt="A", options=opts("x", "y", "z"), answer="A"),
        dict(group=0, gt="C", options=opts("y", "z", "x"), answer="C"),
        dict(group=0, gt="B", options=opts("z", "x", "y"), answer="x"),  # option-text match
        dict(group=1, gt="A", options=opts("p", "q", "r"), answer="A"),
        dict(group=1, gt="C", options=opts("q", "r", "p"), answer="A")]
    s = B.score_mmbench(recs)
    assert s["headline"] == 50.0 and s["questions"] == 2 and math.isclose(s["per_rotation_accuracy"], 80.0)


def test_mmbench_reader_makes_rotations_without_copies(tmp_path):
    import base64, csv, io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    os.makedirs(tmp_path / "mmbench")
    with open(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        w.writerow(["7", "Which?", "nan", "x", "y", "z", "", "B", "cat", base64.b64encode(buf.getvalue()).decode()])
    items = B.read_mmbench(str(tmp_path))
    assert [it["id"] for it in items] == ["7/r0", "7/r1", "7/r2"]
    for it in items:  # the right answer follows "y" through the rotations
        assert it["meta"]["options"][it["meta"]["gt"]] == "y" and it["meta"]["group"] == 7
        assert "\nD." not in it["question"]
    assert [it["meta"]["gt"] for it in items] == ["B", "A", "C"]


def test_cvbench_and_mmvp():
    opts = dict(A="1", B="2")
    recs = [dict(source="ADE20K", gt="A", options=opts, answer="A"), dict(source="ADE20K", gt="A", options=opts, answer="B"),
            dict(source="COCO", gt="B", options=opts, answer="(B)"), dict(source="Omni3D", gt="A", options=opts, answer="B")]
    s = B.score_cvbench(recs)
    assert s["per_source"] == dict(ADE20K=50.0, COCO=100.0, Omni3D=0.0)
    assert s["headline"] == ((50 + 100) / 2 + 0) / 2
    opts = dict(A="open", B="closed")
    recs = [dict(pair=0, gt="A", options=opts, answer="(a)"), dict(pair=0, gt="B", options=opts, answer="closed"),
            dict(pair=1, gt="A", options=opts, answer="a"), dict(pair=1, gt="B", options=opts, answer="(a) open")]
    s = B.score_mmvp(recs)
    assert s["headline"] == 50.0 and s["question_accuracy"] == 75.0


# -----------------------------------------------------------------------------
# the paper's averages from its own rows (CARPE.md Tables 2 and 3)

PAPER_TABLE2 = {  # ImageNet, Caltech101, Flowers102, Food101 -> Average
    "LLaVA1.5-7B": ((26.4, 55.4, 6.7, 29.5), 29.5), "+ ImageNet fine-tune": ((78.0, 54.4, 6.7, 22.9), 40.5),
    "WiSE-FT": ((48.1, 56.2, 6.6, 26.9), 34.4), "LEVI": ((73.3, 43.5, 3.7, 20.8), 35.3),
    "SPHINX-13B": ((32.3, 49.7, 17.7, 36.3), 34.0), "CARPE": ((73.4, 60.4, 15.4, 32.7), 45.4),
    "CARPE-MoE": ((64.5, 65.6, 16.7, 37.7), 46.1)}
PAPER_TABLE3 = {  # SQA, TextVQA, POPE, MME, MMBench, CV-Bench, MMVP -> Average
    "LLaVA1.5-7B": ((69.4, 58.3, 85.9, 1862.7, 64.7, 46.0, 63.0), 68.6),
    "+ ImageNet fine-tune": ((66.8, 57.0, 85.9, 1744.2, 62.1, 37.9, 56.6), 64.7),
    "WiSE-FT": ((68.0, 57.8, 85.1, 1803.5, 64.0, 46.1, 59.0), 67.1),
    "LEVI": ((69.4, 49.2, 84.5, 1752.1, 64.0, 47.4, 61.3), 66.2),
    "SPHINX-13B": ((69.3, 51.6, 80.7, 1798.3, 66.9, 61.3, 66.6), 69.4),
    "CARPE": ((68.4, 55.8, 85.2, 1826.5, 64.8, 58.8, 64.0), 69.7),
    "CARPE-MoE": ((68.0, 57.4, 84.7, 1861.7, 64.0, 58.8, 65.0), 70.1)}


def truncate1(x):
    return math.floor(x * 10 + 1e-6) / 10


def test_summary_reproduces_paper_averages():
    row = lambda name: {**dict(zip(B.CLS_BENCHES, PAPER_TABLE2[name][0])), **dict(zip(B.VL_BENCHES, PAPER_TABLE3[name][0]))}
    # the check values, rounded as our tables print them
    assert f"{B.table2_average(row('LLaVA1.5-7B')):.1f}" == "29.5" and f"{B.table3_average(row('LLaVA1.5-7B')):.1f}" == "68.6"
    assert f"{B.table2_average(row('CARPE-MoE')):.1f}" == "46.1" and f"{B.table3_average(row('CARPE-MoE')):.1f}" == "70.1"
    # every row of both tables: the paper truncates to one decimal (CARPE 45.48 -> 45.4, SPHINX 69.47 -> 69.4)
    for name in PAPER_TABLE2:
        assert truncate1(B.table2_average(row(name))) == PAPER_TABLE2[name][1], name
        assert truncate1(B.table3_average(row(name))) == PAPER_TABLE3[name][1], name
    md = B.markdown_tables([("CARPE-MoE", row("CARPE-MoE"), {"imagenet": (0.26, 0.74), "sqa": (0.13, 0.87)})])
    assert "| CARPE-MoE | 64.5 | 65.6 | 16.7 | 37.7 | 46.1 |" in md
    assert "| 1861.7 |" in md and "| 70.1 |" in md and "| CARPE-MoE | 0.26 / 0.74 | 0.13 / 0.87 |" in md
    assert B.table2_average({"imagenet": 50.0}) is None  # no average over a partial row


# -----------------------------------------------------------------------------
# end to end on synthetic copies of every benchmark

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return tiny.build_tiny_benchmarks(str(tmp_path_factory.mktemp("bench")), per_class=2, n_vl=4)


@pytest.fixture(scope="session")
def full_eval(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "llava")
    E.main(["--bench", "all", "--preset", "tiny", "--base", "tiny", "--data-root", tiny_data, "--out", out])
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_end_to_end_writes_every_output(full_eval, tiny_data):
    for bench in B.BENCH_GROUPS["all"]:
        items = B.read_bench(bench, tiny_data)
        preds = read_jsonl(os.path.join(full_eval, bench, "predictions.jsonl"))
        assert [p["id"] for p in preds] == [it["id"] for it in items], bench
        with open(os.path.join(full_eval, bench, "metrics.json")) as f:
            m = json.load(f)
        assert m["n"] == len(items) and m["bench"] == bench and m["headline"] is not None
        # vanilla LLaVA: the whole weight is on the language side
        assert m["context_weights"] == dict(vision=0.0, language=1.0) and m["routing"] is None
        # metrics are the scorer applied to the predictions file
        assert m["headline"] == B.score_bench(bench, preds)["headline"]
    assert os.path.exists(os.path.join(full_eval, "summary.json"))
    with open(os.path.join(full_eval, "summary.md")) as f:
        md = f.read()
    assert "Table 2" in md and "Table 3" in md and "| llava |" in md


def test_missing_files_name_what_is_expected(tmp_path):
    expected = dict(imagenet="imagenet", sqa="llava_test_CQM-A.json", textvqa="llava_textvqa_val_v051_ocr.jsonl",
                    pope="val2014", mme="MME_Benchmark_release_version", mmbench="mmbench_dev_20230712.tsv",
                    cvbench="cvbench", mmvp="Questions.csv")
    for bench, name in expected.items():
        with pytest.raises(FileNotFoundError, match=name):
            B.read_bench(bench, str(tmp_path))
    os.makedirs(tmp_path / "cvbench")
    with pytest.raises(FileNotFoundError, match="test_2d.jsonl"):
        B.read_bench("cvbench", str(tmp_path))
    os.makedirs(tmp_path / "imagenet" / "val")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        B.read_bench("imagenet", str(tmp_path))


def test_resume_no_duplicates_nothing_missing(full_eval, tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / "resume")
    args = ["--bench", "mme", "--preset", "tiny", "--base", "tiny", "--data-root", tiny_data, "--out", out]
    E.main(args + ["--limit", "5"])
    path = os.path.join(out, "mme", "predictions.jsonl")
    assert len(read_jsonl(path)) == 5
    # a crash mid-write: the file ends in a torn line
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:len(text) - 40])
    generated = []
    real = E.generate_records

    def counting(model, processor, image_transform, batches, *a):
        generated.extend(it["id"] for b in batches for it in b)
        return real(model, processor, image_transform, batches, *a)
    monkeypatch.setattr(E, "generate_records", counting)
    E.main(args)
    items = B.read_bench("mme", tiny_data)
    preds = read_jsonl(path)
    assert [p["id"] for p in preds] == [it["id"] for it in items]  # complete, in order, no duplicates
    assert len(generated) == len(items) - 4  # the 4 intact lines were not generated again
    reference = {p["id"]: p["answer"] for p in read_jsonl(os.path.join(full_eval, "mme", "predictions.jsonl"))}
    assert {p["id"]: p["answer"] for p in preds} == reference
    generated.clear()
    E.main(args)  # a finished run generates nothing
    assert generated == [] and len(read_jsonl(path)) == len(items)
    with pytest.raises(ValueError, match="another setting"):  # another prompt setting into the same folder
        E.main(args + ["--max-new-tokens", "3"])


def test_torchrun_sharded_equals_single_process(full_eval, tiny_data, tmp_path):
    out = str(tmp_path / "sharded")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "eval.py"), "--bench", "mme,mmbench,imagenet", "--preset", "tiny", "--base", "tiny",
           "--data-root", tiny_data, "--out", out]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for bench in ("mme", "mmbench", "imagenet"):
        assert sorted(os.listdir(os.path.join(out, bench))) == ["metrics.json", "predictions.jsonl", "run.json"]
        sharded = read_jsonl(os.path.join(out, bench, "predictions.jsonl"))
        single = read_jsonl(os.path.join(full_eval, bench, "predictions.jsonl"))
        assert [(p["id"], p["answer"]) for p in sharded] == [(p["id"], p["answer"]) for p in single], bench
        with open(os.path.join(out, bench, "metrics.json")) as f, open(os.path.join(full_eval, bench, "metrics.json")) as g:
            assert json.load(f)["headline"] == json.load(g)["headline"]


# -----------------------------------------------------------------------------
# WiSE-FT

@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory):
    """Two imagenet-ft style run dirs around one tiny base, with different projector weights."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("runs")
    base = str(root / "base")
    tiny.save_tiny_base(*tiny.tiny_llava(seed=0), base)
    dirs = []
    for seed in (1, 2):
        llava, _ = carpe.load_base(base)
        model = carpe.build_model("imagenet-ft", llava)
        g = torch.Generator().manual_seed(seed)
        state = {k: (v + 0.5 * torch.randn(v.shape, generator=g)).contiguous() for k, v in model.trainable_state_dict().items()}
        d = str(root / f"ft{seed}")
        os.makedirs(d)
        save_file(state, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(dict(method="imagenet-ft", base=base, carpe=None, moe=None, train={}), f)
        dirs.append(d)
    return base, dirs


def test_wise_ft_endpoints_exact_and_midpoint(run_dirs, tmp_path):
    from safetensors.torch import load_file
    _, (a, b) = run_dirs
    A, B = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    for alpha, expect in ((0.0, A), (1.0, B)):
        out = common.interpolate_weights(a, b, alpha, str(tmp_path / f"w{alpha}"))
        merged = load_file(os.path.join(out, "model.safetensors"))
        assert merged.keys() == expect.keys()
        assert all(torch.equal(merged[k], expect[k]) for k in expect), alpha
        assert os.path.exists(os.path.join(out, "config.json"))  # a loadable run dir
    mid = load_file(os.path.join(common.interpolate_weights(a, b, 0.5, str(tmp_path / "mid")), "model.safetensors"))
    assert all(torch.allclose(mid[k], (A[k] + B[k]) / 2) for k in A)


def test_wise_ft_eval_at_alpha0_is_endpoint_a(run_dirs, tiny_data, tmp_path):
    _, (a, b) = run_dirs
    common = ["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data]
    E.main(common + ["--ckpt", a, "--out", str(tmp_path / "a")])
    E.main(common + ["--wise-ft", a, b, "--alpha", "0", "--out", str(tmp_path / "w")])
    pa = read_jsonl(str(tmp_path / "a" / "mmvp" / "predictions.jsonl"))
    pw = read_jsonl(str(tmp_path / "w" / "mmvp" / "predictions.jsonl"))
    E.main(common + ["--ckpt", b, "--out", str(tmp_path / "b")])
    pb = read_jsonl(str(tmp_path / "b" / "mmvp" / "predictions.jsonl"))
    assert [p["answer"] for p in pa] != [p["answer"] for p in pb]  # A and B differ, so the check can fail
    assert [p["answer"] for p in pa] == [p["answer"] for p in pw]


def test_wise_ft_base_dirs_and_refusals(run_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    base, (a, _) = run_dirs
    other = str(tmp_path / "base2")
    tiny.save_tiny_base(*tiny.tiny_llava(seed=3), other)
    merged = common.interpolate_weights(base, other, 1.0, str(tmp_path / "m"))
    llava, _ = carpe.load_base(merged)  # a tiny-base dir again
    ref = carpe.load_base(other)[0].state_dict()
    assert ref.keys() == llava.state_dict().keys()
    assert all(torch.equal(v, ref[k]) for k, v in llava.state_dict().items())
    # mismatched names: a run dir against a base dir, and a set with one extra tensor
    with pytest.raises(ValueError, match="different tensors"):
        common.interpolate_weights(a, base, 0.5, str(tmp_path / "x"))
    extra = str(tmp_path / "extra")
    shutil.copytree(a, extra)
    state = load_file(os.path.join(a, "model.safetensors"))
    save_file({**state, "llava.lm_head.weight": torch.zeros(3)}, os.path.join(extra, "model.safetensors"))
    with pytest.raises(ValueError, match=r"llava\.lm_head\.weight is in .*extra but not in"):
        common.interpolate_weights(extra, a, 0.5, str(tmp_path / "y"))
    shaped = str(tmp_path / "shaped")
    shutil.copytree(a, shaped)
    key = sorted(state)[0]
    save_file({**state, key: torch.zeros(2, 2)}, os.path.join(shaped, "model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor {key} has shape"):
        common.interpolate_weights(a, shaped, 0.5, str(tmp_path / "z"))


# -----------------------------------------------------------------------------
# the comparison table from real eval dirs

def test_comparison_table_from_eval_dirs(full_eval, tiny_data, tmp_path, capsys):
    other = str(tmp_path / "carpe-untrained")
    E.main(["--bench", "imagenet,mme", "--preset", "tiny", "--base", "tiny", "--method", "carpe", "--integrator-heads", "4",
            "--data-root", tiny_data, "--out", other])
    table_file = str(tmp_path / "table.md")
    capsys.readouterr()
    E.main(["--table", full_eval, other, "--table-out", table_file])
    printed = capsys.readouterr().out
    with open(table_file) as f:
        md = f.read()
    assert md.strip() == printed.strip()
    lines = md.splitlines()
    llava_row = next(l for l in lines if l.startswith("| llava |") and l.count("|") == 7)
    with open(os.path.join(full_eval, "imagenet", "metrics.json")) as f:
        assert f"| {json.load(f)['headline']:.1f} |" in llava_row
    carpe_rows = [l for l in lines if l.startswith("| carpe-untrained |")]
    assert len(carpe_rows) == 3  # Tables 2, 3 and 4
    assert carpe_rows[0].endswith("| - | - | - | - |")  # only ImageNet was evaluated: no average
    assert "0.50 / 0.50" in carpe_rows[2]  # an untrained context encoder gives (0.5, 0.5)


# -----------------------------------------------------------------------------
# CARPE-MoE run dir: dict pixel_values from vision_moe.preprocess, routing histogram

def test_moe_run_dir_records_routes(run_dirs, tiny_data, tmp_path):
    import collections
    import moe
    from safetensors.torch import save_file
    base, _ = run_dirs
    llava, _ = carpe.load_base(base)
    moe_config = tiny.tiny_moe_config()
    cfg = carpe.CarpeConfig(integrator_heads=4)
    model = carpe.build_model("carpe", llava, cfg, vision_moe=moe.build_vision_moe(llava, moe_config))
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    for k in state:  # a router and context encoder that say something
        if "router" in k or "context_encoder" in k:
            state[k] = torch.randn(state[k].shape, generator=g)
    run = str(tmp_path / "moe-run")
    os.makedirs(run)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(run, "model.safetensors"))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(dict(method="carpe", base=base, carpe=cfg.to_dict(), moe=moe_config.to_dict(), train={}), f)
    E.main(["--bench", "mme", "--preset", "tiny", "--ckpt", run, "--data-root", tiny_data])
    preds = read_jsonl(os.path.join(run, "eval", "mme", "predictions.jsonl"))
    with open(os.path.join(run, "eval", "mme", "metrics.json")) as f:
        m = json.load(f)
    routes = collections.Counter(str(p["route"]) for p in preds)
    assert m["routing"] == dict(routes) and sum(routes.values()) == len(preds)
    assert set(routes) <= {"0", "1", "2", "3"}
    w = m["context_weights"]
    assert math.isclose(w["vision"] + w["language"], 1.0, rel_tol=1e-5) and w["vision"] != 0.5


# -----------------------------------------------------------------------------
# the check: after the tiny training run, CARPE classifies the synthetic shapes far above
# chance, and far better than the base, which never saw a classification prompt. It runs the
# README's commands (train.py --preset tiny, then eval.py); about 80 s once the tiny base
# pre-stage is cached in .cache/ (the other tests' runs build it on first use, ~1.5 min).

def test_tiny_training_run_beats_chance_and_base(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run, data_root = str(tmp_path / "run"), str(tmp_path / "data")
    tiny.build_tiny_benchmarks(data_root, seed=1, per_class=10)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--out", run],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = {}
    for name, flags in (("carpe", ["--ckpt", run]), ("llava", ["--method", "llava"])):
        out = str(tmp_path / f"eval-{name}")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--bench", "imagenet", "--preset", "tiny",
                            "--data-root", data_root, "--out", out, *flags], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(os.path.join(out, "imagenet", "metrics.json")) as f:
            scores[name] = json.load(f)["headline"]
    chance = 100 / 6  # six shapes
    print(f"tiny ImageNet (synthetic shapes): base LLaVA {scores['llava']:.1f}, CARPE {scores['carpe']:.1f}, chance {chance:.1f}")
    assert scores["carpe"] > 2.5 * chance, scores
    assert scores["carpe"] > scores["llava"] + 25, scores


def test_wise_ft_base_against_its_imagenet_ft_run(run_dirs, tiny_data, tmp_path):
    """The paper's WiSE-FT in our harness: --wise-ft BASE RUN interpolates the run's projector
    with the base's own projector; alpha 0 is vanilla LLaVA, alpha 1 the fine-tuned run."""
    from safetensors.torch import load_file
    base, (run, _) = run_dirs
    common = ["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data]
    E.main(common + ["--base", base, "--method", "llava", "--out", str(tmp_path / "vanilla")])
    E.main(common + ["--ckpt", run, "--out", str(tmp_path / "ft")])
    E.main(common + ["--wise-ft", base, run, "--alpha", "0", "--out", str(tmp_path / "w0")])
    E.main(common + ["--wise-ft", base, run, "--alpha", "1", "--out", str(tmp_path / "w1")])
    answers = lambda d: [p["answer"] for p in read_jsonl(str(tmp_path / d / "mmvp" / "predictions.jsonl"))]
    assert answers("vanilla") != answers("ft")  # the endpoints differ, so the checks below can fail
    assert answers("w0") == answers("vanilla") and answers("w1") == answers("ft")
    side = load_file(str(tmp_path / "w0" / "wise_ft_base_side" / "model.safetensors"))
    llava, _ = carpe.load_base(base)
    proj = {f"llava.model.{k}": v for k, v in llava.model.named_parameters() if k.startswith("multi_modal_projector.")}
    assert side.keys() == proj.keys() and all(torch.equal(side[k], proj[k]) for k in proj)


def test_closed_world_prompt_lists_every_label_shuffled_per_item(tiny_data):
    items = B.read_bench("imagenet", tiny_data, world="closed")
    labels = sorted({it["meta"]["label"] for it in items})
    lists = []
    for it in items:
        q = it["question"]
        assert q.startswith('What type of object is in this photo? Choose one from "') and q.endswith('".')
        listed = q.split('"')[1].split(", ")
        assert sorted(listed) == labels
        lists.append(tuple(listed))
    assert len(set(lists)) > 1  # the order changes from item to item ...
    again = B.read_bench("imagenet", tiny_data, world="closed")
    assert [it["question"] for it in again] == [it["question"] for it in items]  # ... but never between runs or ranks


def test_eval_prompt_ids_match_training_tokenisation(tmp_path):
    """Eval prompts are the training prompts' ids exactly (same segment-wise tokenisation around the
    image tokens), left-padded; the first supervised training label follows right after them."""
    import carpe
    import data
    llava, processor = tiny.tiny_llava()
    P = data.n_image_tokens(processor)
    collate = E.BatchCollator(processor.tokenizer, carpe.make_image_transform(processor), P)
    conversation = data.ConversationTokenizer(processor.tokenizer, P, processor.tokenizer.convert_tokens_to_ids("<image>"))
    image_path = str(tmp_path / "x.png")
    from PIL import Image
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image_path)
    questions = ["What shape is it?", "Is there a red star in the picture? Answer yes or no."]
    items = [dict(question=q, image=image_path) for q in questions]
    _, input_ids, attention_mask, pixel_values = collate([items])
    assert pixel_values.shape[0] == 2 and (attention_mask[:, -1] == 1).all() and (attention_mask[:, 0] == 0).any()
    for row, mask, q in zip(input_ids, attention_mask, questions):
        ids, labels, _ = conversation(["<image>\n" + q, "circle"])
        first_answer = next(i for i, l in enumerate(labels) if l != data.IGNORE_INDEX)
        assert row[mask.bool()].tolist() == ids[:first_answer]
