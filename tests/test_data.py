"""data.py: vicuna_v1 formatting and label masking, the ImageNet prompts, the 1:7 mix and its
rank shards, the collate, the synthetic data set, and errors on bad input."""
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import carpe
import data
from data import SYSTEM_PROMPT
import tiny  # noqa: E402

IGNORE = data.IGNORE_INDEX


@pytest.fixture(scope="module")
def processor():
    return tiny.tiny_llava()[1]


@pytest.fixture(scope="module")
def conv_tok(processor):
    tok = processor.tokenizer
    return data.ConversationTokenizer(tok, data.n_image_tokens(processor), tok.convert_tokens_to_ids("<image>"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return tiny.ensure_synthetic(str(tmp_path_factory.mktemp("cache")))


def supervised_spans(ids, labels):
    """Contiguous runs of supervised positions -> list of id lists."""
    spans, current = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE:
            assert l == i, "a supervised label must be the token itself (HF shifts inside the loss)"
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_masking_multiturn_with_image(processor, conv_tok):
    tok = processor.tokenizer
    # the <image> tag sits after the question, as in many LLaVA entries: it must move to the start
    turns = ["What is the colour of the shape?\n<image>", "red", "How many shapes are there?", "two",
             "Where is the shape?", "left"]
    ids, labels, truncated = conv_tok(turns, "s1")
    assert not truncated and len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE
    spans = supervised_spans(ids, labels)
    assert [tok.decode(s) for s in spans] == [" red</s>", " two</s>", " left</s>"]
    image_id = tok.convert_tokens_to_ids("<image>")
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == 36 and positions == list(range(positions[0], positions[0] + 36))
    text = tok.decode([t for t in ids if t != image_id])
    assert text == (f"<s>{SYSTEM_PROMPT} USER: \nWhat is the colour of the shape? ASSISTANT: red</s>"
                    "USER: How many shapes are there? ASSISTANT: two</s>USER: Where is the shape? ASSISTANT: left</s>")
    # the image tokens come right after "USER: " of the first turn
    assert tok.decode(ids[:positions[0]]).endswith("USER: ")
    # the first prompt is token for token what eval.py feeds the model (vicuna_prompt + processor)
    prompt = processor(text=data.vicuna_prompt("What is the colour of the shape?", True),
                       images=[Image.new("RGB", (48, 48))], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[:len(prompt)] == prompt
    assert labels[len(prompt)] != IGNORE and all(l == IGNORE for l in labels[:len(prompt)])


def test_masking_text_only(processor, conv_tok):
    tok = processor.tokenizer
    ids, labels, _ = conv_tok(["What number comes after three?", "four", "And after four?", "five"], "t1")
    assert tok.convert_tokens_to_ids("<image>") not in ids
    assert [tok.decode(s) for s in supervised_spans(ids, labels)] == [" four</s>", " five</s>"]
    assert tok.decode(ids) == (f"<s>{SYSTEM_PROMPT} USER: What number comes after three? ASSISTANT: four</s>"
                               "USER: And after four? ASSISTANT: five</s>")
    prompt = processor.tokenizer(data.vicuna_prompt("What number comes after three?", False))["input_ids"]
    assert ids[:len(prompt)] == prompt


def test_truncation_counted_and_never_cuts_image(processor, conv_tok):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    long = data.ConversationTokenizer(tok, 36, image_id, model_max_length=110)
    turns = ["<image>\nWhat is the colour of the shape?", "red", "How many shapes are there?", "two"]
    full, _, _ = conv_tok(turns)
    ids, labels, truncated = long(turns, "s2")
    assert truncated and len(ids) == 110 and ids == full[:110]
    assert ids.count(image_id) == 36
    short = data.ConversationTokenizer(tok, 36, image_id, model_max_length=40)
    with pytest.raises(data.BadSampleError, match="sample s3.*image tokens"):
        short(turns, "s3")


def test_mix_ratio_shards_and_resume():
    plan = data.MixPlan(n_llava=7000, n_imagenet=5000, mix=(1, 7), seed=3)
    assert plan.imagenet_per_epoch == 1000 and plan.epoch_length == 8000
    order = plan.order(0)
    assert (order[:, 0] == 1).sum() == 1000 and sorted(order[order[:, 0] == 0, 1].tolist()) == list(range(7000))
    # interleaved: every window of 800 positions holds about 100 ImageNet samples
    windows = (order[:, 0] == 1).reshape(10, 800).sum(1)
    assert windows.min() > 60 and windows.max() < 140
    # consecutive epochs take other ImageNet images, and another order
    img0 = set(order[order[:, 0] == 1, 1].tolist())
    order1 = plan.order(1).copy()
    assert not img0 & set(order1[order1[:, 0] == 1, 1].tolist())
    assert not np.array_equal(order1[:, 0], plan.order(0)[:, 0])
    # rank shards: disjoint, cover the full steps, each about 1:7
    world, batch = 4, 64
    shards = [list(data.RankSampler(plan.epoch_length, batch, r, world, epoch=0)) for r in range(world)]
    positions = [p for shard in shards for _, p in shard]
    steps = plan.epoch_length // batch
    assert sorted(positions) == list(range(steps * batch))
    for shard in shards:
        n_img = sum(plan.item(e, p)[0] for e, p in shard)
        assert abs(n_img / len(shard) - 1 / 8) < 0.03
    # deterministic, and a resume from a step boundary continues the same stream
    assert shards[1] == list(data.RankSampler(plan.epoch_length, batch, 1, world, epoch=0))
    resumed = list(data.RankSampler(plan.epoch_length, batch, 1, world, epoch=0, start_position=10 * batch))
    assert resumed == shards[1][10 * batch // world:]
    with pytest.raises(ValueError, match="step boundary"):
        data.RankSampler(plan.epoch_length, batch, 1, world, epoch=0, start_position=10)


def test_imagenet_only_mix_is_every_image():
    plan = data.MixPlan(n_llava=0, n_imagenet=500, mix=(1, 7))
    order = plan.order(2)
    assert (order[:, 0] == 1).all() and sorted(order[:, 1].tolist()) == list(range(500))


def test_classification_prompts_balanced():
    names = [f"class{i}" for i in range(50)]
    rng = random.Random(0)
    templates, closed_count = Counter(), 0
    n = 4000
    for i in range(n):
        target = rng.randrange(50)
        turns, template, closed = data.classification_turns(names, target, rng, closed_k=5)
        templates[template] += 1
        closed_count += closed
        assert turns[0].startswith("<image>\n" + data.CLASSIFICATION_TEMPLATES[template])
        assert turns[1] == names[target]
        if closed:
            listed = turns[0].split('Choose one from "')[1].rstrip('".').split(", ")
            assert len(listed) == 5 and names[target] in listed and len(set(listed)) == 5
        else:
            assert "Choose one" not in turns[0]
    assert len(data.CLASSIFICATION_TEMPLATES) == 20 and len(templates) == 20
    assert min(templates.values()) > 0.7 * n / 20 and max(templates.values()) < 1.3 * n / 20
    assert abs(closed_count / n - 0.5) < 0.04
    assert data.CLASSIFICATION_TEMPLATES[:2] == ["Identify the object in this image:",
                                                 "What object can you spot in the picture?"]


def test_classification_candidates_shuffled():
    names = [f"c{i}" for i in range(10)]
    first = Counter()
    rng = random.Random(1)
    for _ in range(400):
        turns, _, closed = data.classification_turns(names, 3, rng, closed_k=4)
        if closed:
            first[turns[0].split('Choose one from "')[1].split(", ")[0] == "c3"] += 1
    assert 0.1 < first[True] / sum(first.values()) < 0.45  # the true class is not always listed first


def test_collate_pads_right_and_orders_images(processor):
    tok = processor.tokenizer
    red, blue = Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    samples = [data.Sample("a", "llava", [1, 5, 6], [IGNORE, IGNORE, 6], red, False),
               data.Sample("b", "llava", [1, 7], [IGNORE, 7], None, True, skipped=[("bad-1", "cannot read image")]),
               data.Sample("c", "imagenet", [1, 8, 9, 10], [IGNORE, 8, 9, 10], blue, False)]
    transform = carpe.make_image_transform(processor)
    batch = data.Collator(tok.pad_token_id, transform)(samples)
    assert batch.input_ids.tolist() == [[1, 5, 6, 3], [1, 7, 3, 3], [1, 8, 9, 10]]
    assert batch["input_ids"] is batch.input_ids  # item access reads the same fields
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE], [IGNORE, 8, 9, 10]]
    assert torch.equal(batch.pixel_values, transform([red, blue]))  # only samples with an image, in order
    assert batch.n_truncated == 1 and batch.n_imagenet == 1 and batch.ids == ["a", "b", "c"]
    assert batch.skipped == [("bad-1", "cannot read image")]
    # a MoE transform returns a dict of tensors per expert: passed through as is
    moe_like = lambda images: {"clip": torch.full((len(images), 1), 1.0), "dino": torch.full((len(images), 2), 2.0)}
    batch = data.Collator(tok.pad_token_id, moe_like)(samples)
    assert set(batch.pixel_values) == {"clip", "dino"} and batch.pixel_values["dino"].shape == (2, 2)
    assert data.Collator(tok.pad_token_id, transform)(samples[1:2]).pixel_values is None


def test_synthetic_data_is_consistent(synthetic, processor):
    entries = json.load(open(os.path.join(synthetic, "conversations.json")))
    index = data.ImageNetIndex(synthetic, os.path.join(synthetic, "classnames.txt"))
    assert index.class_names == sorted(tiny.SHAPES) and len(index) == 6 * tiny.SyntheticConfig().images_per_class
    with_image = [e for e in entries if "image" in e]
    assert len(entries) - len(with_image) == tiny.SyntheticConfig().text_only
    assert any(len(e["conversations"]) > 2 for e in entries)
    # the colour answers match the drawn pixels: the most saturated pixels have the named colour
    checked = 0
    for e in with_image:
        turns = [t["value"] for t in e["conversations"]]
        for q, a in zip(turns[::2], turns[1::2]):
            if "colour" in q:
                pixels = np.asarray(Image.open(os.path.join(synthetic, e["image"])).convert("RGB")).reshape(-1, 3).astype(int)
                saturated = pixels[(pixels.max(1) - pixels.min(1)) > 100]
                nearest = min(tiny.COLOURS, key=lambda c: np.abs(saturated.mean(0) - tiny.COLOURS[c]).sum())
                assert nearest == a, e["id"]
                checked += 1
        if checked >= 20:
            break
    assert checked >= 20
    # deterministic: drawing again gives the same data
    assert tiny.ensure_synthetic(os.path.dirname(synthetic)) == synthetic  # cached
    again = os.path.join(os.path.dirname(synthetic), "again")
    tiny.build_synthetic(again, tiny.SyntheticConfig())
    assert open(os.path.join(again, "conversations.json")).read() == open(os.path.join(synthetic, "conversations.json")).read()
    first = with_image[0]["image"]
    assert open(os.path.join(again, first), "rb").read() == open(os.path.join(synthetic, first), "rb").read()


def test_dataset_items_follow_the_plan(synthetic, processor, tmp_path):
    config = tiny.synthetic_data_config(synthetic, seed=1)
    config.cache_dir = str(tmp_path)
    ds, skipped = data.TrainDataset.from_config(config, processor)
    assert skipped == 0 and ds.plan.imagenet_per_epoch == round(ds.plan.n_llava / 7)
    tok = processor.tokenizer
    for p in range(12):
        d, item = ds.describe(0, p), ds[(0, p)]
        assert item.id == d.id and (item.image is None) == (d.image is None) and not item.skipped
        answers = [tok.decode(s) for s in supervised_spans(item.input_ids, item.labels)]
        assert answers == [" " + a + "</s>" for a in d.turns[1::2]]
        if d.source == "imagenet":
            assert d.turns[1] == ds.imagenet.class_names[d.target]
            assert os.path.basename(os.path.dirname(d.image)) == d.turns[1]
    assert ds.describe(0, 5) == ds.describe(0, 5)


# -----------------------------------------------------------------------------
# bad input

def write_json(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f)
    return str(path)


def llava_config(tmp_path, json_path, **overrides):
    return data.DataConfig(llava_json=str(json_path), image_root=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                           **overrides)


def test_bad_entries_are_named_or_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    good = dict(id="good", image="ok.png", conversations=[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}])
    bad = [
        dict(id="missing-img", image="nope.png", conversations=good["conversations"]),
        dict(id="bad-role", conversations=[{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]),
        dict(id="order", conversations=[{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]),
        dict(id="no-gpt", conversations=[{"from": "human", "value": "q"}]),
        dict(id="two-tags", image="ok.png", conversations=[{"from": "human", "value": "<image> <image> q"},
                                                           {"from": "gpt", "value": "a"}]),
        dict(id="tag-no-image", conversations=[{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]),
        dict(id="empty-answer", conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": " \n"}]),
    ]
    path = write_json(tmp_path / "d.json", [good] + bad)
    with pytest.raises(data.BadSampleError) as e:
        data.ensure_llava_cache(llava_config(tmp_path, path))
    msg = str(e.value)
    assert "7 bad entries" in msg and "--skip-bad-samples" in msg and path in msg
    assert "missing-img" in msg and str(tmp_path / "nope.png") in msg
    assert "bad-role" in msg and "'assistant'" in msg
    assert "order" in msg and "alternate" in msg
    assert "no-gpt" in msg and "gpt turn" in msg
    assert "two-tags" in msg and "tag-no-image" in msg
    assert "id empty-answer): turn 1 (gpt) is empty" in msg
    assert "good" not in msg.replace("no-gpt", "")
    assert not os.listdir(tmp_path / "cache")  # nothing cached from a failed check
    records, skipped = data.load_llava_records(llava_config(tmp_path, path, skip_bad_samples=True))
    assert len(records) == 1 and records[0][0] == "good"
    assert skipped.ids == [b["id"] for b in bad] and "nope.png" in skipped.items[0][1]
    with pytest.raises(data.BadSampleError, match="--data .*not found"):
        data.ensure_llava_cache(llava_config(tmp_path, tmp_path / "absent.json"))


def test_class_name_file_formats_and_errors(tmp_path):
    for wnid in ("n001", "n002", "n003"):
        os.makedirs(tmp_path / "train" / wnid)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / wnid / "x.JPEG")
    (tmp_path / "names.txt").write_text("goldfish\nshark\nhen\n")
    assert data.ImageNetIndex(str(tmp_path), str(tmp_path / "names.txt")).class_names == ["goldfish", "shark", "hen"]
    (tmp_path / "wnids.txt").write_text("n003\then\nn001\tgoldfish, Carassius auratus\nn002\tshark\n")
    index = data.ImageNetIndex(str(tmp_path), str(tmp_path / "wnids.txt"))
    assert index.class_names == ["goldfish, Carassius auratus", "shark", "hen"] and index.targets.tolist() == [0, 1, 2]
    (tmp_path / "short.txt").write_text("goldfish\nshark\n")
    with pytest.raises(data.BadSampleError, match=r"short\.txt has 2 names but the ImageFolder has 3 class dirs"):
        data.ImageNetIndex(str(tmp_path), str(tmp_path / "short.txt"))
    (tmp_path / "partial.txt").write_text("n001\tgoldfish\nn002\tshark\n")
    with pytest.raises(data.BadSampleError, match=r"partial\.txt has no name for class dirs \['n003'\]"):
        data.ImageNetIndex(str(tmp_path), str(tmp_path / "partial.txt"))
    with pytest.raises(data.BadSampleError, match="--imagenet .*train/<class_dir>"):
        data.ImageNetIndex(str(tmp_path / "train"))


def test_encode_prompt_is_the_training_prefix(processor, conv_tok):
    """encode_prompt gives the generation prompt (BOS .. "ASSISTANT:") that training gives the first user turn."""
    tok = processor.tokenizer
    for question, has_image in [("What is the colour of the shape?", True), ("What comes after three?", False)]:
        prompt = conv_tok.encode_prompt(question, has_image)
        assert prompt == [tok.bos_token_id] + conv_tok.encode(data.vicuna_prompt(question, has_image))
        ids, labels, _ = conv_tok([("<image>\n" if has_image else "") + question, "red"])
        first = next(i for i, l in enumerate(labels) if l != IGNORE)
        assert ids[:first] == prompt and tok.decode(prompt).endswith("ASSISTANT:")
