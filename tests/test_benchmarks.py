"""Tests for benchmarks.py: per benchmark a golden table of messy answers with the verdict its
official script gives (each worked out by reading that script; surprising ones say why), the
prompts as LLaVA-1.5 / Cambrian build them, readers on small hand-made files (a malformed row
costs one item), the registry, and the paper's tables."""
import base64
import csv
import io
import json
import math
import os

import pytest
from PIL import Image

import benchmarks as B
import data
import tiny


# -----------------------------------------------------------------------------
# classification: VLMClassifier get_accuracy (label.lower() in pred.lower())

CLASSIFICATION_GOLDEN = [  # (label, answer, correct)
    ("golden retriever", "This is a Golden Retriever.", True),
    ("Golden Retriever", "golden retriever", True),
    ("cat", "A dog", False),
    ("cat", "concatenate", True),  # a substring anywhere counts
    ("tench", "Tench.", True),
    ("tench", "", False),
    ("sea lion", "sea\nlion", False),  # a newline is not a space
    ("ox", "It is a box", True),
    ("T-shirt/top", "a t-shirt/top", True),
]


def test_classification_golden():
    for label, answer, correct in CLASSIFICATION_GOLDEN:
        s = B.score_classification([dict(label=label, answer=answer)])
        assert s["correct"] == int(correct), (label, answer)


def test_classification_substring_and_exact():
    recs = [dict(label="Golden Retriever", answer="This is a golden retriever."),
            dict(label="cat", answer="A dog"),
            dict(label="tench", answer="Tench.")]
    sub = B.score_classification(recs, "substring")
    assert sub["correct"] == 2 and math.isclose(sub["headline"], 200 / 3)
    assert B.score_classification(recs)["correct"] == 2  # the default is the official rule
    exact = B.score_classification(recs, "exact")
    assert exact["correct"] == 1  # only "Tench." equals its label once the trailing period goes
    with pytest.raises(ValueError, match="lenient"):
        B.score_classification(recs, "lenient")


# -----------------------------------------------------------------------------
# ScienceQA: LLaVA eval_science_qa.py (answers stored stripped by model_vqa_science.py)

SQA_GOLDEN = [  # (answer, number of options, letter read or None = FAILED)
    ("A", 3, "A"), ("  C  ", 3, "C"), ("C\n", 3, "C"),
    ("a", 3, None),  # exact upper-case letters only
    ("B.", 3, None),  # neither a bare letter nor "X. " (needs the space) nor the regex
    ("B. cat", 3, "B"), ("B.cat", 3, None), ("(B)", 3, None),
    ("The answer is B.", 3, "B"),
    ("The answer is B", 3, None),  # the regex wants one more character after the letter
    ("The answer is Bob", 3, "B"),  # ... any character, so "Bob" gives B
    ("The answer is B\nbecause", 3, None),  # ... but not a newline
    ("the answer is B.", 3, None),  # case-sensitive
    ("I think the answer is B.", 3, None),
    ("Looking at it. The answer is A.", 3, "A"),
    ("The answer is B. The answer is C.", 3, None),  # two matches: FAILED
    ("B. The answer is C.", 3, "B"),  # the "X. " prefix is tried first
    ("The answer is (B).", 3, None),
    ("The answer is Z.", 3, None), ("D", 3, None),  # not one of this question's choices
    ("E. five", 5, "E"), ("A or B", 3, None), ("Answer: B", 3, None), ("", 3, None),
]


def test_sqa_golden():
    for answer, n, letter in SQA_GOLDEN:
        assert B.parse_sqa_letter(answer, n) == letter, (answer, n)
    recs = [dict(answer="The answer is B.", gt="B", n_options=2), dict(answer="A", gt="B", n_options=2),
            dict(answer="", gt="B", n_options=2, error="image did not decode")]
    s = B.score_sqa(recs)
    assert math.isclose(s["headline"], 100 / 3) and s["correct"] == 1 and s["total"] == 3


# -----------------------------------------------------------------------------
# TextVQA: m4c_evaluator.py EvalAIAnswerProcessor and TextVQAAccuracyEvaluator

TEXTVQA_NORMALISED = [  # (answer, normalised)
    ("Two", "2"), ("The Apple.", "apple"), ("an apple!", "apple"), ("none", "0"), ("ten.", "10"),
    ("coca-cola", "coca cola"), ("coca - cola", "coca cola"), ("dont", "don't"), ("Dont", "don't"),
    ("Im", "im"),  # the table's "Im" key is capitalised and never meets lower-cased text
    ("3.5", "3.5"), ("1,000", "1000"), ("it's", "it 's"), ("The dog's bone", "dog 's bone"),
    ("yes\nno", "yes no"), ("hello world?", "hello world"), ("a", ""),
    ("(a)", ""),  # the brackets become spaces, then "a" is an article
    ("x;-y", "x y"),
    ("." * 33 + "x", ".x"),  # re.UNICODE passed as sub()'s count: at most 32 periods go
    ("a/b c", "b c"), ("STOP", "stop"), ("#1", "#1"),
]


def test_textvqa_normalisation_golden():
    for answer, normalised in TEXTVQA_NORMALISED:
        assert B.normalize_vqa_answer(answer) == normalised, answer


def test_textvqa_soft_accuracy():
    gts = ["2"] * 3 + ["3"] * 7
    # leave-one-out: 3 subsets keep 2 matches (2/3), 7 keep 3 (1.0)
    assert math.isclose(B.vqa_soft_accuracy("two", gts), (3 * 2 / 3 + 7) / 10)
    assert math.isclose(B.vqa_soft_accuracy("2", ["2"] + ["x"] * 9), 9 * (1 / 3) / 10)
    assert B.vqa_soft_accuracy("the 3", gts) == 1.0
    assert B.vqa_soft_accuracy("four", gts) == 0.0 and B.vqa_soft_accuracy("", gts) == 0.0
    s = B.score_textvqa([dict(answer="Three.", answers=gts), dict(answer="", answers=gts, error="bad image")])
    assert math.isclose(s["headline"], 50.0)


# -----------------------------------------------------------------------------
# POPE: LLaVA eval_pope.py

POPE_GOLDEN = [  # (answer, read as)
    ("Yes", "yes"), ("yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"), ("not", "no"),
    ("NO", "yes"),  # only the words "No", "not", "no" count
    ("Not", "yes"), ("nope", "yes"), ("Nothing", "yes"),
    ("", "yes"),  # an empty answer reads as yes
    ("There is not a dog.", "no"), ("There is no.", "no"),
    ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("Yes, there is no dog.", "no"), ("Yes, no", "no"),
    ("no\nthere is none", "yes"),  # the words are split on spaces only: "no\nthere" is one word
    ("I don't know", "yes"), ("No, there is none", "no"),
]


def test_pope_golden():
    for answer, read in POPE_GOLDEN:
        assert B.parse_pope_yes_no(answer) == read, answer


def test_pope_f1_per_split_and_no_yes_at_all():
    recs = []
    # adversarial: tp=1 fp=1 fn=0 tn=0 -> P=.5 R=1 F1=2/3; popular: all right -> F1=1;
    # random: the model never says yes (eval_pope divides by zero here) -> F1 = 0
    for split, pairs in dict(adversarial=[("Yes", "yes"), ("Yes", "no")], popular=[("Yes", "yes"), ("No", "no")],
                             random=[("No", "yes"), ("No", "no")]).items():
        recs += [dict(split=split, answer=a, label=l) for a, l in pairs]
    s = B.score_pope(recs)
    assert math.isclose(s["headline"], 100 * (2 / 3 + 1 + 0) / 3)
    assert math.isclose(s["splits"]["adversarial"]["yes_ratio"], 100.0)
    assert s["splits"]["random"]["precision"] == 0.0 and s["splits"]["random"]["f1"] == 0.0
    assert math.isclose(s["accuracy"], 100 * (0.5 + 1 + 0.5) / 3)


# -----------------------------------------------------------------------------
# MME: LLaVA's convert_answer_to_mme.py + MME eval_tool/calculation.py parse_pred_ans

MME_GOLDEN = [  # (answer, read as)
    ("Yes", "yes"), ("yes.", "yes"), ("No", "no"), ("NO", "no"), ("Yes, it is.", "yes"),
    ("Not sure", "no"), ("None", "no"), ("nope", "no"),
    ("Yesterday", "yes"),  # the first 4 characters hold "yes"
    ("know", "no"),  # ... or "no"
    ("no yes", "no"), ("yes no", "yes"),
    ("There is a dog", "other"), ("The answer is yes", "other"), ("I don't know", "other"), ("", "other"),
    ("Yes\tit is", "yes"),  # a tab would split the converter's line; read whole
    ("\nNo", "no"),
]


def test_mme_golden():
    for answer, read in MME_GOLDEN:
        assert B.parse_mme_yes_no(answer) == read, answer


def test_mme_pairs_and_totals():
    recs = []
    # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50 -> 125
    recs += [dict(subtask="existence", image="e/1", gt="yes", answer="Yes"), dict(subtask="existence", image="e/1", gt="no", answer="no"),
             dict(subtask="existence", image="e/2", gt="yes", answer="yes"), dict(subtask="existence", image="e/2", gt="no", answer="yes")]
    # code_reasoning (cognition): one image, both right -> 200
    recs += [dict(subtask="code_reasoning", image="c/1", gt="yes", answer="yes"),
             dict(subtask="code_reasoning", image="c/1", gt="no", answer="No.")]
    # OCR: "other" answers are wrong, empty (failed) ones too -> 0
    recs += [dict(subtask="OCR", image="o/1", gt="yes", answer="maybe"), dict(subtask="OCR", image="o/1", gt="no", answer="")]
    s = B.score_mme(recs)
    assert s["subtasks"]["existence"] == dict(score=125.0, acc=75.0, acc_plus=50.0, total=4)
    assert s["subtasks"]["OCR"]["score"] == 0.0
    assert s["perception"] == 125.0 and s["cognition"] == 200.0 and s["headline"] == 325.0


def test_mme_prompt_as_llava_asks():
    assert B.mme_question("Is there a dog in this image? Please answer yes or no.") == \
        "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    assert B.mme_question("Is this a cat?  Please answer yes or no.").endswith("cat?\n" + B.SHORT_ANSWER)
    # golden: the "text" of LLaVA's own question file (playground/data/eval/MME/llava_mme.jsonl, 2,374 lines,
    # every one "<question>\nAnswer the question using a single word or phrase.", none keeping "Please answer"),
    # from MME release lines; the second release question has no "?" and LLaVA's text has none either
    golden = {
        "Is a python code shown in the picture? Please answer yes or no.":
            "Is a python code shown in the picture?\nAnswer the question using a single word or phrase.",
        "Is the cricket bat under the batter's body Please answer yes or no.":
            "Is the cricket bat under the batter's body\nAnswer the question using a single word or phrase.",
    }
    for release, official in golden.items():
        assert B.mme_question(release) == official


# -----------------------------------------------------------------------------
# MMBench: VLMEvalKit can_infer (can_infer_option, then can_infer_text), no ChatGPT fallback

MMB_OPTIONS = dict(A="dog", B="cat", C="red fox", D="2")
MMBENCH_GOLDEN = [  # (answer, letter read or None)
    ("B", "B"), ("(C)", "C"), ("C.", "C"), ("**B**", "B"), ("D. 2", "D"), ("Option D: 2", "D"),
    ("b", None),  # only upper-case letters are option tokens, and "b" is no option text
    ("A cat", "A"),  # the letter token wins over the text
    ("The answer is B.", "B"), ("The correct answer is **C**.", "C"),
    ("The answer is b", "B"),  # the late "answer is X" pattern ignores case
    ("I think the answer is B because the cat is visible", "B"),  # B is not in the last 4 tokens; the pattern finds it
    ("A or B", None),  # two letters, no pattern, no option text
    ("It is A, B or C", None),
    ("cat", "B"), ("a red fox", "C"), ("2", "D"),
    ("dog and cat", None),  # two option texts
    ("I can clearly see a small cat sitting there", None),  # longer than twice the option texts together
    ("", None),
    ("Z", "Z"), ("Cannot determine the answer", "Z"),  # VLMEvalKit's "no answer" letter: always wrong
]


def test_mmbench_golden():
    for answer, letter in MMBENCH_GOLDEN:
        assert B.can_infer(answer, dict(MMB_OPTIONS)) == letter, answer


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
    recs[0]["gt"] = None  # a malformed row: its group can never count
    assert B.score_mmbench(recs)["headline"] == 0.0


# -----------------------------------------------------------------------------
# CV-Bench: Cambrian ade_test.py / coco_test.py / omni_test.py extract_mcq_answer + compute_metrics

CVB_2D = dict(A="1", B="2", C="3", D="4")
CVBENCH_GOLDEN = [  # (source, options, gt, answer, correct)
    ("ADE20K", CVB_2D, "C", "C", True), ("COCO", CVB_2D, "C", "c", True), ("ADE20K", CVB_2D, "C", "(C)", True),
    ("ADE20K", CVB_2D, "C", "C.", True), ("ADE20K", CVB_2D, "C", "(c) 3", True),
    ("ADE20K", CVB_2D, "C", "Cat", True),  # only the first character is compared
    ("ADE20K", CVB_2D, "C", "3", False),  # 2D never accepts the option text
    ("COCO", CVB_2D, "C", "right.", False), ("COCO", CVB_2D, "C", "There are 3", False),
    ("ADE20K", CVB_2D, "C", "The answer is C.", True), ("ADE20K", CVB_2D, "C", "Answer: C", True),
    ("ADE20K", CVB_2D, "C", "The answer is: C", False),  # "answer is" leaves ": c", whose first character is ":"
    ("ADE20K", CVB_2D, "C", "", False), ("ADE20K", CVB_2D, "C", "C:", True),
    ("Omni3D", dict(A="lamp", B="table"), "A", "A", True), ("Omni3D", dict(A="lamp", B="table"), "A", "a,", True),
    ("Omni3D", dict(A="lamp", B="table"), "A", "lamp", False),  # cut to "l" before the text comparison
    ("Omni3D", dict(A="1", B="2"), "B", "2", True),  # ... so only a one-character option text can match
    ("Omni3D", dict(A="lamp", B="table"), "A", "Answer: (a)", True),
]


def test_cvbench_golden():
    for source, options, gt, answer, correct in CVBENCH_GOLDEN:
        assert B.cvbench_correct(dict(source=source, options=options, gt=gt, answer=answer)) == correct, (source, answer)


def test_cvbench_per_source_average():
    opts = dict(A="1", B="2")
    recs = [dict(source="ADE20K", gt="A", options=opts, answer="A"), dict(source="ADE20K", gt="A", options=opts, answer="B"),
            dict(source="COCO", gt="B", options=opts, answer="(B)"), dict(source="Omni3D", gt="A", options=opts, answer="B")]
    s = B.score_cvbench(recs)
    assert s["per_source"] == dict(ADE20K=50.0, COCO=100.0, Omni3D=0.0)
    assert s["headline"] == ((50 + 100) / 2 + 0) / 2


# -----------------------------------------------------------------------------
# MMVP: Cambrian mmvp_test.py (exact letter or exact option text after its cleaning; pairs)

MMVP_GOLDEN = [  # (answer, correct) for options (a) Open (b) Closed, answer (a)
    ("A", True), ("a", True), ("(a)", True), ("(A)", True), ("A.", True), ("a:", True), ("a)", True),
    ("((a))", True), ("A\n", True), ("open", True), ("Open.", True), ("The answer is A.", True),
    ("Answer: open", True),
    ("A. Open", False), ("(a) Open", False),  # letter and text together are neither
    ("The answer is: A", False),  # "answer is" leaves ": a", which no rule strips
    ("It is open", False), ("closed", False), ("B", False), ("", False),
]


def test_mmvp_golden():
    for answer, correct in MMVP_GOLDEN:
        r = dict(answer=answer, gt="A", options=dict(A="Open", B="Closed"))
        assert B.mmvp_correct(r) == correct, answer


def test_mmvp_pairs_and_question_accuracy():
    opts = dict(A="open", B="closed")
    recs = [dict(pair=0, gt="A", options=opts, answer="(a)"), dict(pair=0, gt="B", options=opts, answer="closed"),
            dict(pair=1, gt="A", options=opts, answer="a"), dict(pair=1, gt="B", options=opts, answer="(a) open")]
    s = B.score_mmvp(recs)
    assert s["headline"] == 50.0 and s["pair_accuracy"] == 50.0 and s["question_accuracy"] == 75.0
    assert "question accuracy" in s["note"] and "63.0" in s["note"]


# -----------------------------------------------------------------------------
# prompts and readers on small hand-made files

def png_bytes(colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_mmbench(root, rows):
    os.makedirs(os.path.join(root, "mmbench"), exist_ok=True)
    with open(os.path.join(root, "mmbench", "mmbench_dev_20230712.tsv"), "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        w.writerows(rows)


def test_mmbench_reader_bad_rows_cost_one_item(tmp_path):
    good = base64.b64encode(png_bytes()).decode()
    write_mmbench(str(tmp_path), [
        ["7", "Which?", "nan", "x", "y", "z", "", "B", "cat", good],
        ["8", "Which one?", "A hint.", "p", "q", "NA", "r", "E", "cat", good],  # "E" is no option; "NA" ends the options
        ["9", "What?", "", "u", "v", "", "", "A", "cat", "abc"],  # not base64
    ])
    items = B.read_bench("mmbench", str(tmp_path))
    assert [it.id for it in items] == ["7/r0", "7/r1", "7/r2", "8/r0", "8/r1", "9/r0", "9/r1"]
    for it in items[:3]:  # the right answer follows "y" through the rotations
        assert it.error is None and it.meta["options"][it.meta["gt"]] == "y" and it.meta["group"] == 7
        assert "\nD." not in it.question and it.image == {"b64": good}
    assert [it.meta["gt"] for it in items[:3]] == ["B", "A", "C"]
    assert items[0].question == "Which?\nA. x\nB. y\nC. z\n" + B.LETTER_ANSWER  # model_vqa_mmbench.py, no hint
    assert items[3].question == "A hint.\nWhich one?\nA. p\nB. q\n" + B.LETTER_ANSWER
    assert all("answer 'E'" in it.error for it in items[3:5])
    assert all("not valid base64" in it.error and "index 9" in it.error for it in items[5:])
    assert data.load_image(items[0].image).size == (8, 8)  # decoded only when asked


def test_mmbench_reader_copies_point_at_their_image(tmp_path):
    good = base64.b64encode(png_bytes()).decode()
    write_mmbench(str(tmp_path), [["3", "Q?", "nan", "x", "y", "", "", "A", "c", good],
                                  ["1000003", "Q?", "nan", "y", "x", "", "", "B", "c", "3"]])
    items = B.read_bench("mmbench", str(tmp_path))
    assert [(it.id, it.meta["group"], it.meta["gt"], it.error) for it in items] == [("3", 3, "A", None), ("1000003", 3, "B", None)]
    assert items[1].image == {"b64": good}


def test_load_image_names_what_failed(tmp_path):
    """Benchmark items decode through data.load_image, the decoder training uses (one function)."""
    assert not hasattr(B, "open_image")
    with pytest.raises(data.BadSampleError, match="cannot read image the base64 image"):
        data.load_image({"b64": base64.b64encode(b"not an image").decode()})
    with pytest.raises(data.BadSampleError, match="nope.png.*No such file"):
        data.load_image(str(tmp_path / "nope.png"))
    truncated = tmp_path / "half.png"
    truncated.write_bytes(png_bytes()[:30])
    with pytest.raises(data.BadSampleError, match="half.png"):
        data.load_image(str(truncated))
    assert data.load_image({"bytes": png_bytes((0, 255, 0))}).getpixel((0, 0)) == (0, 255, 0)


def test_sqa_textvqa_pope_prompts(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / "scienceqa" / "images" / "test")
    cqm = [dict(id="5", image="5/image.png", conversations=[
        {"from": "human", "value": "Context: A magnet.\nWhich pole?\nA. north\nB. south\n<image>"},
        {"from": "gpt", "value": "A"}]),
        dict(id="6", conversations=[{"from": "human", "value": "No image?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}])]
    (tmp_path / "scienceqa" / "llava_test_CQM-A.json").write_text(json.dumps(cqm))
    (tmp_path / "scienceqa" / "problems.json").write_text(json.dumps({"5": dict(answer=1, choices=["north", "south"])}))
    items = B.read_bench("sqa", root)
    assert len(items) == 1 and items[0].meta == dict(gt="B", n_options=2)  # problems.json decides; text-only skipped
    assert items[0].question == "Context: A magnet.\nWhich pole?\nA. north\nB. south\n" + B.LETTER_ANSWER
    # TextVQA: LLaVA's question text as is; the annotation found by (image id, question)
    os.makedirs(tmp_path / "textvqa" / "train_images")
    text = "what brand is it?\nReference OCR token: Coca, Cola\n" + B.SHORT_ANSWER
    lines = [dict(question_id="ab12", image="ab12.jpg", text=text), dict(question_id="zz", image="zz.jpg", text="who?\n" + B.SHORT_ANSWER)]
    (tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    ann = dict(data=[dict(question_id=1, image_id="ab12", question="What brand is it?", answers=["coca cola"] * 10)])
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps(ann))
    items = B.read_bench("textvqa", root)
    assert items[0].question == text and items[0].meta["answers"] == ["coca cola"] * 10 and items[0].error is None
    assert "no annotation" in items[1].error  # costs one item
    # POPE: the question + the short-answer instruction; a label that is not yes/no costs one item
    os.makedirs(tmp_path / "pope" / "coco")
    os.makedirs(tmp_path / "pope" / "val2014")
    for split in B.POPE_SPLITS:
        rows = [dict(question_id=1, image="a.jpg", text="Is there a dog in the image?", label="yes"),
                dict(question_id=2, image="a.jpg", text="Is there a cat in the image?", label="maybe")]
        (tmp_path / "pope" / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = B.read_bench("pope", root)
    assert items[0].question == "Is there a dog in the image?\n" + B.SHORT_ANSWER and items[0].error is None
    assert [it.error is not None for it in items] == [False, True] * 3


def test_cvbench_and_mmvp_prompts_as_cambrian_builds_them(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / "cvbench" / "img")
    prompt = "How many cars are in the image? Select from the following choices.\n(A) 3\n(B) 2"
    rows = [dict(idx=0, type="2D", task="Count", prompt=prompt, choices=["3", "2"], answer="(B)", filename="img/0.png", source="COCO"),
            dict(idx=1, type="2D", task="Count", prompt=prompt, choices=["3", "2"], answer="(E)", filename="img/1.png", source="COCO")]
    (tmp_path / "cvbench" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = B.read_bench("cvbench", root)
    assert items[0].question == prompt + "\n" + B.LETTER_ANSWER
    assert items[0].meta == dict(source="COCO", gt="B", options=dict(A="3", B="2"), task="Count") and items[0].error is None
    assert "(E)" in items[1].error
    os.makedirs(tmp_path / "MMVP" / "MMVP Images")
    with open(tmp_path / "MMVP" / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lndex", "Question", "Options", "Correct Answer"])
        w.writerow([1, "Is the door open?", "(a) Open (b) Closed", "(a)"])
        w.writerow([2, "Is the door open?", "(a) Open (b) Closed", "(b)"])
        w.writerow([3, "Broken?", "(a Open (b) Closed", "(a)"])
        w.writerow([4, "Which?", "(a) Left (b) Right", "(c)"])
    items = B.read_bench("mmvp", root)
    assert items[0].question == "Is the door open? Options:\nA. Open\nB. Closed\n" + B.LETTER_ANSWER
    assert items[1].meta == dict(pair=0, gt="B", options=dict(A="Open", B="Closed")) and items[1].error is None
    assert items[0].image.endswith(os.path.join("MMVP Images", "1.jpg"))
    assert "cannot read the options" in items[2].error and "(c)" in items[3].error
    assert [it.meta["pair"] for it in items] == [0, 0, 1, 1]
    # a failed item is scored as an empty answer: wrong, and its pair with it
    recs = [dict(answer="a" if it.error is None else "", error=it.error, **it.meta) for it in items]
    recs[1]["answer"] = "closed"
    assert B.score_mmvp(recs)["pair_accuracy"] == 50.0


def test_mme_reader_layouts_and_bad_lines(tmp_path):
    base = tmp_path / "MME" / "MME_Benchmark_release_version"
    for subtask in B.MME_PERCEPTION + B.MME_COGNITION:
        split = subtask in ("artwork", "celebrity", "landmark", "posters", "scene")
        image_dir, qa_dir = (base / subtask / "images", base / subtask / "questions_answers_YN") if split else (base / subtask,) * 2
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(qa_dir, exist_ok=True)
        Image.new("RGB", (4, 4)).save(image_dir / "0001.png")
        (qa_dir / "0001.txt").write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
    (base / "OCR" / "0001.txt").write_text("Is it red? Please answer yes or no.\tYes\nno tab here\n")
    (base / "count" / "0002.txt").write_text("How many? Please answer yes or no.\tNo\n")  # no image 0002.*
    items = B.read_bench("mme", str(tmp_path))
    assert len(items) == 14 * 2 + 1
    bad = {it.id: it.error for it in items if it.error}
    assert set(bad) == {"OCR/0001.png/1", "count/0002/0"}
    assert "not 'question<TAB>Yes|No'" in bad["OCR/0001.png/1"] and "no image 0002" in bad["count/0002/0"]
    scene = next(it for it in items if it.id == "scene/0001.png/0")
    assert scene.question == "Is it red?\n" + B.SHORT_ANSWER and scene.meta == dict(subtask="scene", image="scene/0001.png", gt="yes")


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


# -----------------------------------------------------------------------------
# the tiny benchmark folders, the closed world, Fashion-MNIST, the registry

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny.build_tiny_benchmarks(str(tmp_path_factory.mktemp("bench")), per_class=2, n_vl=4)


def test_tiny_benchmarks_read_and_score_empty_answers(tiny_data):
    for bench in B.BENCH_GROUPS["all"]:
        items = B.read_bench(bench, tiny_data)
        assert items and all(it.error is None for it in items), bench
        assert len({it.id for it in items}) == len(items), bench
        # every item failed: scored as the official script scores empty answers, never an exception
        s = B.score_bench(bench, [dict(id=it.id, answer="", error="x", **it.meta) for it in items])
        assert s["headline"] == 0.0 or bench == "pope", (bench, s["headline"])  # POPE reads "" as yes
    sqa = B.read_bench("sqa", tiny_data)
    assert all(it.question.endswith("\n" + B.LETTER_ANSWER) and "<image>" not in it.question for it in sqa)


def test_closed_world_prompt_lists_every_label_shuffled_per_item(tiny_data):
    items = B.read_bench("imagenet", tiny_data, world="closed")
    labels = sorted({it.meta["label"] for it in items})
    lists = []
    for it in items:
        q = it.question
        assert q.startswith('What type of object is in this photo? Choose one from "') and q.endswith('".')
        listed = q.split('"')[1].split(", ")
        assert sorted(listed) == labels
        lists.append(tuple(listed))
    assert len(set(lists)) > 1  # the order changes from item to item ...
    again = B.read_bench("imagenet", tiny_data, world="closed")
    assert [it.question for it in again] == [it.question for it in items]  # ... but never between runs or ranks


def test_closed_k_candidates_hold_the_true_class(tiny_data):
    items = B.read_bench("caltech101", tiny_data, world="closed", closed_k=3)
    sets = set()
    for it in items:
        listed = it.question.split('"')[1].split(", ")
        assert len(listed) == 3 == len(set(listed)) and it.meta["label"] in listed
        assert it.meta == dict(label=it.meta["label"])  # the candidates are rebuilt from the id, never stored
        sets.add(frozenset(listed))
    assert len(sets) > 1
    assert [it.question for it in B.read_bench("caltech101", tiny_data, "closed", 3)] == [it.question for it in items]
    assert B.read_bench("caltech101", tiny_data, "closed", 100)[0].question == \
        B.read_bench("caltech101", tiny_data, "closed")[0].question  # K >= #labels: every label
    assert all(it.question == B.OPEN_WORLD_QUESTION for it in B.read_bench("caltech101", tiny_data, "open", 3))
    with pytest.raises(ValueError, match="closed_k"):
        B.read_bench("caltech101", tiny_data, "closed", 0)


def test_fashion_mnist_reads_and_stays_out_of_the_paper_tables(tmp_path):
    names = ["T-shirt/top", "Trouser", "Pullover"]
    for i, folder in enumerate(["0_tshirt", "1_trouser", "2_pullover"]):
        os.makedirs(tmp_path / "fashion-mnist" / "test" / folder)
        Image.new("L", (28, 28), 40 * i).save(tmp_path / "fashion-mnist" / "test" / folder / "00000.png")
    (tmp_path / "fashion-mnist" / "classnames.txt").write_text("\n".join(names) + "\n")
    items = B.read_bench("fashion-mnist", str(tmp_path))
    assert [it.meta["label"] for it in items] == names and items[0].id == "0_tshirt/00000.png"
    bench = B.BENCHMARKS["fashion-mnist"]
    assert bench.display == "Fashion-MNIST" and "fashion-mnist" not in B.BENCH_GROUPS["all"]
    assert B.BENCH_GROUPS[bench.group] == ("fashion-mnist",)
    row = {**dict(zip(B.CLS_BENCHES, (10.0, 20.0, 30.0, 40.0))), "fashion-mnist": 90.0}
    assert B.table2_average(row) == 25.0
    md = B.markdown_tables([("small", row, {})])
    assert "| Fashion-MNIST |" in md and "| small | 90.0 |" in md


def test_registry_is_the_one_place():
    assert B.BENCH_GROUPS["cls"] == ("imagenet", "caltech101", "flowers102", "food101")
    assert B.BENCH_GROUPS["vl"] == ("sqa", "textvqa", "pope", "mme", "mmbench", "cvbench", "mmvp")
    assert B.BENCH_GROUPS["all"] == B.CLS_BENCHES + B.VL_BENCHES
    for name, b in B.BENCHMARKS.items():
        assert b.name == name and B.MAX_NEW_TOKENS[name] == b.max_new_tokens > 0
    # the official generation limits: LLaVA's SQA / MMBench scripts 1024, model_vqa_loader 128, Cambrian 512
    assert [B.MAX_NEW_TOKENS[b] for b in ("imagenet", "sqa", "pope", "mmbench", "mmvp")] == [64, 1024, 128, 1024, 512]


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
    # the paper's two named checks: LLaVA 29.5 / 68.6 and CARPE-MoE 46.1 / 70.1
    assert f"{B.table2_average(row('LLaVA1.5-7B')):.1f}" == "29.5" and f"{B.table3_average(row('LLaVA1.5-7B')):.1f}" == "68.6"
    assert f"{B.table2_average(row('CARPE-MoE')):.1f}" == "46.1" and f"{B.table3_average(row('CARPE-MoE')):.1f}" == "70.1"
    for name in PAPER_TABLE2:  # every row: the paper truncates its means to one decimal
        assert truncate1(B.table2_average(row(name))) == PAPER_TABLE2[name][1], name
        assert truncate1(B.table3_average(row(name))) == PAPER_TABLE3[name][1], name
    md = B.markdown_tables([("CARPE-MoE", {**row("CARPE-MoE"), "mmvp_question": 71.0}, {"imagenet": (0.26, 0.74), "sqa": (0.13, 0.87)})])
    assert "| CARPE-MoE | 64.5 | 65.6 | 16.7 | 37.7 | 46.1 |" in md and "| 0.26 / 0.74 | 0.13 / 0.87 |" in md
    assert "| 70.1 | 71.0 |" in md and "63.0" in md  # MMVP question accuracy beside the average, and the note
    assert B.table2_average({"imagenet": 50.0}) is None  # no average over a partial row


def test_read_eval_dir_and_comparison_table(tmp_path):
    for bench, m in dict(imagenet=dict(headline=40.0, context_weights=dict(vision=0.3, language=0.7)),
                         mmvp=dict(headline=20.0, question_accuracy=60.0, context_weights=None)).items():
        os.makedirs(tmp_path / "run" / "eval" / bench)
        (tmp_path / "run" / "eval" / bench / "metrics.json").write_text(json.dumps(m))
    scores, weights = B.read_eval_dir(str(tmp_path / "run"))
    assert scores == dict(imagenet=40.0, mmvp=20.0, mmvp_question=60.0) and weights == dict(imagenet=(0.3, 0.7), mmvp=None)
    md = B.comparison_table([str(tmp_path / "run" / "eval")])
    assert "| run | 40.0 |" in md and "| 20.0 | - | 60.0 |" in md
    with pytest.raises(FileNotFoundError, match="no <bench>/metrics.json"):
        B.comparison_table([str(tmp_path)])
