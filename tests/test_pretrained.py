"""pretrained.py: a trained run one call from use. ask builds eval.py's prompts and pixels (same
answers and weights on the same benchmark items, batches padded alike); a saved folder survives a
move and names its base portably; an old-layout run folder (config.json, an absolute base path)
still loads; a Hub id loads from the offline Hub cache, as push_to_hub would have uploaded it;
a run of another class is refused by name; the README's "Use a trained model" snippet runs.

One short tiny train.py run (6 steps on 32 samples per epoch, so epoch 2 trains the context
encoder and the weights differ per prompt) serves every test; tests/test_chat.py reuses it."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw

import common
import data
import eval as E
import pretrained
import tiny
import train
from baselines import LEVI, METHODS, LlavaBaseline, build_model
from benchmarks import BENCHMARKS
from carpe import CARPE, CarpeConfig, load_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOUR_Q = "What is the colour of the shape?"
SHAPE_Q = "What type of object is in this photo?"


def tiny_run_dir(tmp_path_factory):
    """A finished train.py run on the tiny preset, trained once per test session (shared by this
    file and test_chat.py through the session's temp folder)."""
    out = tmp_path_factory.getbasetemp() / "pretrained-tiny-run"
    if not (out / "model.safetensors").is_file():
        args = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused"]))
        tiny.ensure_tiny_world(args.cache_dir)
        train.use_tiny_world(args)
        with open(args.data) as f:
            entries = json.load(f)[:28]
        small = tmp_path_factory.getbasetemp() / "pretrained-small.json"
        small.write_text(json.dumps(entries))
        # 28 conversations + 4 classification prompts = 32 samples, 4 steps per epoch: steps 5-6 train the context encoder
        train.main(["--preset", "tiny", "--data", str(small), "--mix", "1:7", "--batch-size", "8", "--micro-batch-size", "8",
                    "--max-steps", "6", "--num-workers", "0", "--out", str(out)])
    return str(out)


def shape_image(fill="blue", shape="circle"):
    image = Image.new("RGB", (64, 48), "white")  # not square: pad-to-square matters
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((22, 14, 42, 34), fill=fill)
    else:
        draw.polygon([(32, 12), (20, 36), (44, 36)], fill=fill)
    return image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def model(run):
    return pretrained.load(run)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return tiny.build_tiny_benchmarks(str(tmp_path_factory.mktemp("bench")), per_class=2, n_vl=4)


@pytest.fixture(scope="module")
def evaluated(run, bench_root):
    """eval.py's real code on the first 6 items of two tiny benchmarks, into the run's eval/ (its default --out)."""
    E.main(["--bench", "imagenet,pope", "--preset", "tiny", "--ckpt", run, "--data-root", bench_root, "--limit", "6"])
    return os.path.join(run, "eval")


def trainable(m):
    return {k: v.detach().clone() for k, v in m.trainable_state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = trainable(a), trainable(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -----------------------------------------------------------------------------
# ask == eval.py

def test_ask_gives_eval_py_answers_and_weights_on_the_same_items(evaluated, model, bench_root):
    vision_weights = set()
    for name in ("imagenet", "pope"):
        items = BENCHMARKS[name].read(bench_root)[:6]
        with open(os.path.join(evaluated, name, "predictions.jsonl")) as f:
            predicted = [json.loads(line) for line in f]
        assert [p["id"] for p in predicted] == [it.id for it in items]
        asked = []
        for i in range(0, len(items), 4):  # eval.py's tiny batch size: the same left padding
            batch = items[i:i + 4]
            out = model.ask([it.image for it in batch], [it.question for it in batch], max_new_tokens=8,
                            return_dict=True)
            asked += [dict(answer=a, context_weights=list(w), route=r)
                      for a, w, r in zip(out.answer, out.context_weights, out.route)]
        assert [dict(answer=p["answer"], context_weights=p["context_weights"], route=p["route"]) for p in predicted] \
            == asked, name
        vision_weights |= {p["context_weights"][0] for p in asked}
    assert len(vision_weights) > 1  # the context encoder trained: the weights depend on the prompt


def test_history_prompt_is_what_training_gives_the_conversation(model):
    processor = model.processor
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = copy.deepcopy(processor.tokenizer)  # given a ChatML template and its special tokens below
    history = [(COLOUR_Q, "blue"), ("How many shapes are there?", "one")]
    expected = {"vicuna_v1": f"{data.SYSTEM_PROMPT} USER: <image>\n{COLOUR_Q} ASSISTANT: blue</s>USER: How many shapes "
                             f"are there? ASSISTANT: one</s>USER: {SHAPE_Q} ASSISTANT:",
                "chat": f"<|im_start|>user\n<image>\n{COLOUR_Q}<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n"
                        f"<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n"
                        f"<|im_start|>user\n{SHAPE_Q}<|im_end|>\n<|im_start|>assistant\n"}
    for template in ("vicuna_v1", "chat"):
        if template == "chat":
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
            tokenizer.chat_template = chatml
        conv = data.ConversationTokenizer(tokenizer, data.n_image_tokens(processor),
                                          tokenizer.convert_tokens_to_ids("<image>"), template=template)
        ids = pretrained.prompt_ids(conv, SHAPE_Q, True, history)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        n = ids.count(image_id)
        assert n == conv.n_image_tokens
        first = ids.index(image_id)
        text = tokenizer.decode(ids[:first + 1] + ids[first + n:], skip_special_tokens=False)
        assert text.replace(tokenizer.bos_token or "", "", 1) == expected[template], template
        # and the ids are those training gives the whole conversation, up to the last answer
        full, labels, _ = conv(["<image>\n" + COLOUR_Q, "blue", "How many shapes are there?", "one", SHAPE_Q, "a circle"])
        assert full[:len(ids)] == ids and labels[len(ids)] != data.IGNORE_INDEX and labels[len(ids) - 1] == data.IGNORE_INDEX
        # no history: eval.py's prompt
        assert pretrained.prompt_ids(conv, SHAPE_Q, True) == conv.encode_prompt(SHAPE_Q, has_image=True)
    image = shape_image()
    first = model.ask(image, COLOUR_Q, return_dict=True)
    second = model.ask(image, SHAPE_Q, return_dict=True, history=[(COLOUR_Q, first.answer)])
    assert second.context_weights != model.ask(image, SHAPE_Q, return_dict=True).context_weights  # the history is read


# -----------------------------------------------------------------------------
# a portable, shareable folder

def test_save_load_round_trip_after_moving_the_folder(run, evaluated, model, tmp_path):
    images = [shape_image("blue"), shape_image("red", "triangle")]
    questions = [SHAPE_Q, COLOUR_Q]
    before = model.ask(images, questions, return_dict=True)
    saved = tmp_path / "saved"
    model.save_pretrained(str(saved))
    moved = tmp_path / "elsewhere" / "carpe-tiny"
    moved.parent.mkdir()
    shutil.move(str(saved), str(moved))
    loaded = CARPE.from_pretrained(str(moved))
    assert loaded.ask(images, questions, return_dict=True) == before
    assert_same_weights(model, loaded)
    names = sorted(os.listdir(moved))
    assert "config.json" not in names and common.RUN_CONFIG in names and "model.safetensors" in names
    config = common.read_run_config(str(moved))
    assert config["base"] == "preset:tiny" and config["train"]["base"] == "preset:tiny"
    # the card: Hugging Face front matter, the method, how to load it, the eval folder's metrics (copied)
    card = ModelCard.load(str(moved / "README.md"))
    assert card.data.library_name == "carpe" and "carpe" in card.data.tags and card.data.base_model is None
    assert 'load("saved")' in card.text and "context encoder" in card.text  # the name it was saved under
    with open(os.path.join(evaluated, "imagenet", "metrics.json")) as f:
        metrics = json.load(f)
    assert f"| {BENCHMARKS['imagenet'].display} | {metrics['headline']:.2f} |" in card.text
    assert os.path.isfile(moved / "eval" / "imagenet" / "metrics.json") and os.path.isfile(moved / "log.jsonl")
    with pytest.raises(FileExistsError, match="already holds a run"):
        model.save_pretrained(str(moved))
    # a train.py run folder moved as it is loads too
    copy = tmp_path / "run-copy"
    shutil.copytree(run, copy)
    assert pretrained.load(str(copy)).ask(images, questions, return_dict=True) == before


def test_a_run_of_another_class_is_refused_naming_the_generic_loader(run):
    with pytest.raises(TypeError, match=r"is a 'carpe' run \(a CARPE\), not a LEVI.*pretrained.load"):
        LEVI.from_pretrained(run)
    with pytest.raises(TypeError, match="not a LlavaBaseline"):
        LlavaBaseline.from_pretrained(run)
    assert set(pretrained.METHOD_CLASSES) == set(METHODS)
    llava, _ = load_base(pretrained.resolve_base("preset:tiny"))
    for method in METHODS:  # the loader's classes are build_model's
        assert type(build_model(method, llava, CarpeConfig(integrator_heads=4))) is pretrained.METHOD_CLASSES[method]


def test_old_format_run_folder_still_loads(run, model, tmp_path):
    """A run folder written before the rename: config.json, the base as an absolute cache path."""
    images, questions = [shape_image("blue"), shape_image("red", "triangle")], [SHAPE_Q, COLOUR_Q]
    expected = model.ask(images, questions, return_dict=True)
    tiny_base = pretrained.resolve_base("preset:tiny")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(run, "model.safetensors"), old / "model.safetensors")
    config = dict(common.read_run_config(run), base=os.path.abspath(tiny_base))
    (old / "config.json").write_text(json.dumps(config))
    common.write_manifest(str(old), ["model.safetensors", "config.json"])
    loaded = pretrained.load(str(old))
    assert loaded.ask(images, questions, return_dict=True) == expected
    # saving it writes the new layout, the base named portably
    pretrained.save_pretrained(loaded, str(tmp_path / "resaved"))
    assert common.read_run_config(str(tmp_path / "resaved"))["base"] == "preset:tiny"
    assert not os.path.exists(tmp_path / "resaved" / "config.json")
    # the same folder from another machine: its absolute tiny base is not here, its settings key is today's
    config["base"] = "/nonexistent/machine/.cache/" + os.path.basename(tiny_base)
    (old / "config.json").write_text(json.dumps(config))
    common.write_manifest(str(old), ["model.safetensors", "config.json"])
    assert pretrained.load(str(old)).ask(images, questions, return_dict=True) == expected
    # a gone folder that is no preset's: named, with what to do
    config["base"] = "/nonexistent/machine/llava-1.5-7b-hf"
    (old / "config.json").write_text(json.dumps(config))
    common.write_manifest(str(old), ["model.safetensors", "config.json"])
    with pytest.raises(FileNotFoundError, match="base folder /nonexistent/machine/llava-1.5-7b-hf does not exist.*base="):
        pretrained.load(str(old))
    assert pretrained.portable_base("/root/.cache/huggingface/hub/models--llava-hf--llava-1.5-7b-hf/snapshots/abc") \
        == "llava-hf/llava-1.5-7b-hf"


def test_push_to_hub_uploads_a_folder_that_loads_by_hub_id_offline(run, model, tmp_path, monkeypatch):
    """push_to_hub against a stand-in for the Hub's two calls, which lays the uploaded folder out
    as the local Hub cache holds a download; then a fresh process loads it by id with
    HF_HUB_OFFLINE=1 (chat.py --question, the scripting path)."""
    hub, repo_id, commit = tmp_path / "hub", "someone/carpe-tiny", "0123456789abcdef0123456789abcdef01234567"
    calls = []

    def create_repo(repo, private=None, token=None, exist_ok=False):
        calls.append(("create_repo", repo, exist_ok))

    def upload_folder(repo_id, folder_path, commit_message=None, token=None):
        calls.append(("upload_folder", repo_id))
        repo = hub / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(pretrained, "create_repo", create_repo)
    monkeypatch.setattr(pretrained, "upload_folder", upload_folder)
    model.push_to_hub(repo_id)
    assert calls == [("create_repo", repo_id, True), ("upload_folder", repo_id)]
    uploaded = hub / "models--someone--carpe-tiny" / "snapshots" / commit
    assert {"README.md", "model.safetensors", common.RUN_CONFIG, common.MANIFEST} <= set(os.listdir(uploaded))
    assert f'load("{repo_id}")' in (uploaded / "README.md").read_text()
    image = tmp_path / "shape.png"
    shape_image("red", "triangle").save(image)
    expected = model.ask(str(image), COLOUR_Q, return_dict=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", repo_id, "--image", str(image),
                        "--question", COLOUR_Q, "--max-new-tokens", "64", "--json"], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == dict(answer=expected.answer,
                                                                 context_weights=list(expected.context_weights), route=None)
    # the card of a 7B run names its Hub base and data sets in the front matter
    card = pretrained.model_card(dict(method="carpe", base="llava-hf/llava-1.5-7b-hf", template="vicuna_v1",
                                      train=dict(data="/data/llava/llava_v1_5_mix665k.json", imagenet="/data/imagenet")),
                                 "user/carpe-7b", [])
    meta = ModelCard(card).data
    assert meta.base_model == "llava-hf/llava-1.5-7b-hf"
    assert meta.datasets == ["liuhaotian/LLaVA-Instruct-150K", "ILSVRC/imagenet-1k"]


def test_carpe_moe_round_trip_keeps_answers_and_routes(tmp_path):
    """CARPE-MoE built in code (no run behind it): saved with base=, loaded as the run it now is;
    the route comes back by expert name."""
    import moe
    base = pretrained.resolve_base("preset:tiny")
    llava, processor = load_base(base)
    vision_moe = moe.build_vision_moe(llava, tiny.tiny_moe_config(), image_processor=processor.image_processor)
    built = CARPE(llava, CarpeConfig(integrator_heads=4), vision_moe=vision_moe).eval()
    g = torch.Generator().manual_seed(0)
    built.load_trainable_state_dict({k: v + 0.3 * torch.randn(v.shape, generator=g)
                                     for k, v in built.trainable_state_dict().items()})
    with pytest.raises(ValueError, match="pass base="):
        built.save_pretrained(str(tmp_path / "nobase"))
    built.save_pretrained(str(tmp_path / "moe"), base="preset:tiny")
    shutil.move(str(tmp_path / "moe"), str(tmp_path / "moe-moved"))
    loaded = CARPE.from_pretrained(str(tmp_path / "moe-moved"))
    assert loaded.vision_moe is not None and loaded.run_config["moe"]["experts"][1]["name"] == "siglip"
    built.processor, built.image_transform, built.template = processor, vision_moe.preprocess, "vicuna_v1"
    images = [shape_image("blue"), shape_image("red", "triangle"), None]
    questions = [SHAPE_Q, COLOUR_Q, "What is two plus two?"]
    out = loaded.ask(images, questions, return_dict=True)
    assert out == built.ask(images, questions, return_dict=True)
    assert out.route[:2] == [r for r in out.route[:2] if r in vision_moe.expert_names] and out.route[2] is None
    assert_same_weights(built, loaded)


# -----------------------------------------------------------------------------
# the README's snippet runs as written after `python train.py --preset tiny --out runs/tiny`

def readme_snippet():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = re.search(r"^## Use a trained model[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        pytest.fail("README.md has no '## Use a trained model' section; it must hold a ```python block that runs "
                    "as written after `python train.py --preset tiny --out runs/tiny`")
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    if code is None:
        pytest.fail("README.md's '## Use a trained model' section has no ```python block")
    return code.group(1)


def test_readme_use_a_trained_model_snippet_runs(run, tmp_path, monkeypatch, capsys):
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 10, "the README promises at most 10 lines"
    shutil.copytree(run, tmp_path / "runs" / "tiny")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md: Use a trained model", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "the snippet printed nothing"


def test_eval_of_a_moved_run_resumes_its_own_eval_folder(run, evaluated, bench_root, tmp_path):
    """A run folder moved with its eval/ evaluates again without refusal and without regenerating:
    run.json ties the predictions to the weights' digest, not to where the folder lies."""
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    before = {b: open(moved / "eval" / b / "predictions.jsonl").read() for b in ("imagenet", "pope")}
    E.main(["--bench", "imagenet,pope", "--preset", "tiny", "--ckpt", str(moved), "--data-root", bench_root,
            "--limit", "6"])
    for b, text in before.items():
        assert open(moved / "eval" / b / "predictions.jsonl").read() == text  # nothing generated again
