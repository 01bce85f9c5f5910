"""lmms_carpe.py in lmms-eval's own environment (.venv-lmms): a short train.py run, evaluated by
eval.py and by lmms-eval (a subprocess; --model carpe found through the entry point `register`
writes) on the same tiny ImageNet items, in lmms-eval's own task format and scored by its own
code: the same answers item by item, the same exact-match score, and a multiple_choice task
whose loglikelihoods equal an independent computation (the model's labelled forward)."""
import glob
import json
import os
import subprocess

import pytest
import torch

import eval as E
import pretrained
import tiny
import train
from data import vicuna_prompt
from kernels import IGNORE_INDEX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv-lmms", "bin")
INSTALL = ("python -m venv --system-site-packages .venv-lmms && .venv-lmms/bin/pip install -r requirements-lmms.txt "
           "&& .venv-lmms/bin/pip uninstall -y torchvision")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(VENV_BIN, "lmms-eval")),
                                reason=f"lmms-eval's environment .venv-lmms is missing; install it with: {INSTALL}")


SETUP = """
import json
from importlib.metadata import entry_points
from lmms_eval.api.instance import Instance
import lmms_carpe as L
L.register({site!r})
L.write_task("imagenet", {bench!r}, {tasks!r}, max_new_tokens=8)
L.write_task("imagenet", {bench!r}, {tasks!r}, choices=True)
found = [[p.name, p.value, str(p.dist._path.parent)] for p in entry_points(group="lmms_eval.models")]
model = L.CarpeLmms(pretrained={run!r}, device="cpu", batch_size=2)
image = {bench!r} + "/imagenet/val/circle/000.png"
model.task_dict = dict(t=dict(test=[[image], [image, image], [], [image]]))
question = "<image>\\nWhat type of object is in this photo?"
requests = [Instance("generate_until", (question, dict(max_new_tokens=8, until=until), lambda doc: doc, n, "t", "test"),
                     n, dict(task="t", doc_id=n, repeats=1)) for n, until in enumerate([[], [], [], ["e"]])]
print(json.dumps(dict(entry_points=found, answers=model.generate_until(requests), image=image)))
"""


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    """A 6-step CARPE run (the context encoder trains from step 5, so the weights depend on the
    prompt), eval.py on 12 tiny ImageNet items (exact-match rule), and lmms-eval on the same items
    as a generate_until and a multiple_choice task. -> the paths and outputs."""
    root = tmp_path_factory.mktemp("lmms")
    args = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused"]))
    tiny.ensure_tiny_world(args.cache_dir)
    train.use_tiny_world(args)
    data = root / "small.json"
    data.write_text(json.dumps(json.load(open(args.data))[:28]))
    run = str(root / "run")
    train.main(["--preset", "tiny", "--data", str(data), "--mix", "1:7", "--batch-size", "8",
                "--micro-batch-size", "4", "--num-workers", "0", "--max-steps", "6", "--out", run])
    bench = tiny.build_tiny_benchmarks(str(root / "bench"), per_class=2, n_vl=2)
    eval_out = str(root / "eval")
    E.main(["--bench", "imagenet", "--preset", "tiny", "--ckpt", run, "--data-root", bench, "--match", "exact",
            "--out", eval_out])
    # lmms-eval's side, all in its own environment: the entry point, the tasks, the evaluation
    site, tasks, out = str(root / "site"), str(root / "tasks"), str(root / "out")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, REPO]), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(root / "hf-datasets"), HF_HOME=str(root / "hf-home"))
    os.makedirs(site)
    # one process (imports cost seconds): the entry point, both tasks, what lmms-eval will see, and
    # the model's generate_until on requests a task file cannot make (several images, none, `until`)
    script = root / "setup.py"
    script.write_text(SETUP.format(site=site, bench=bench, tasks=tasks, run=run))
    setup = json.loads(subprocess.run([os.path.join(VENV_BIN, "python"), str(script)], check=True, env=env,
                                      cwd=str(root), capture_output=True, text=True).stdout.splitlines()[-1])
    proc = subprocess.run([os.path.join(VENV_BIN, "lmms-eval"), "--model", "carpe", "--model_args",
                           f"pretrained={run},device=cpu", "--include_path", tasks,
                           "--tasks", "carpe_imagenet,carpe_imagenet_choice", "--batch_size", "4",
                           "--output_path", out, "--log_samples"],
                          env=env, cwd=str(root), capture_output=True, text=True, timeout=600)
    # lmms-eval exits 0 even when the evaluation failed: its results file is the evidence
    results = glob.glob(os.path.join(out, "*", "*_results.json"))
    assert len(results) == 1, \
        f"lmms-eval wrote no results (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    samples = {}
    for task in ("carpe_imagenet", "carpe_imagenet_choice"):
        with open(glob.glob(os.path.join(out, "*", f"*_samples_{task}.jsonl"))[0]) as f:
            samples[task] = [json.loads(line) for line in f]
    rows = {task: [json.loads(line) for line in open(os.path.join(tasks, f"{task}.jsonl"))] for task in samples}
    return dict(run=run, eval_dir=os.path.join(eval_out, "imagenet"), results=json.load(open(results[0]))["results"],
                samples=samples, rows=rows, site=site, bench=bench, **setup)


def test_registered_through_the_entry_point(lmms_run):
    assert ["carpe", "lmms_carpe:manifests", lmms_run["site"]] in lmms_run["entry_points"]


def test_generate_until_requests_beyond_the_task_files(lmms_run):
    """An image, several images (answered "", CARPE reads one), no image (the tag dropped, a
    text-only prompt), and a stop string: against model.ask in this environment."""
    model = pretrained.load(lmms_run["run"])
    question = "What type of object is in this photo?"
    with_image = model.ask(lmms_run["image"], question, max_new_tokens=8)
    text_only = model.ask(None, question, max_new_tokens=8)
    cut = with_image[:with_image.index("e")] if "e" in with_image else with_image
    assert lmms_run["answers"] == [with_image, "", text_only, cut]


def test_generate_until_answers_as_eval_py(lmms_run):
    with open(os.path.join(lmms_run["eval_dir"], "predictions.jsonl")) as f:
        predictions = {r["id"]: r["answer"] for r in map(json.loads, f)}
    with open(os.path.join(lmms_run["eval_dir"], "metrics.json")) as f:
        metrics = json.load(f)
    rows, samples = lmms_run["rows"]["carpe_imagenet"], lmms_run["samples"]["carpe_imagenet"]
    assert len(samples) == len(predictions) == 12
    lmms_answers = {rows[s["doc_id"]]["id"]: s["filtered_resps"] for s in samples}
    assert lmms_answers == predictions  # item by item, the same strings
    assert metrics["match"] == "exact"
    assert lmms_run["results"]["carpe_imagenet"]["exact_match,none"] * 100 == pytest.approx(metrics["headline"])


def test_loglikelihood_equals_the_labelled_forward(lmms_run):
    """lmms-eval's multiple_choice: -log p of " <class name>" after the prompt, per choice, against
    the same quantity from the model's forward with labels (the fused loss, the context taken
    from the labels), and lmms-eval's accuracy against the argmin of those."""
    model = pretrained.load(lmms_run["run"])
    tokenizer = model.processor.tokenizer
    conversation = pretrained.conversation_tokenizer(model)
    rows, samples = lmms_run["rows"]["carpe_imagenet_choice"], lmms_run["samples"]["carpe_imagenet_choice"]
    correct = 0
    for s in samples:
        row = rows[s["doc_id"]]
        pixel_values = model.image_transform([pretrained.as_image(row["image"], row["id"])])
        prompt = conversation.encode_prompt(row["question"], has_image=True)
        nlls = []
        for choice in row["choices"]:
            ids = [tokenizer.bos_token_id] + conversation.encode(vicuna_prompt(row["question"], True) + " " + choice)
            assert ids[:len(prompt)] == prompt
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + ids[len(prompt):]])  # (1, T)
            with torch.no_grad():
                out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixel_values, labels=labels)
            nlls.append(float(out.lm_loss) * (len(ids) - len(prompt)))  # mean over the choice's tokens -> sum
        theirs = [float(nll) for nll, _ in s["filtered_resps"]]
        assert theirs == pytest.approx(nlls, rel=1e-4, abs=1e-4), row["id"]
        correct += min(range(len(nlls)), key=nlls.__getitem__) == row["answer_index"]
    assert lmms_run["results"]["carpe_imagenet_choice"]["acc,none"] == pytest.approx(correct / len(samples))

