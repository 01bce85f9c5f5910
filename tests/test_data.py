"""data.py: vicuna_v1 formatting and label masking, the ImageNet prompts, the 1:7 mix and its
rank shards, the collate, the synthetic data set, and errors on bad input."""
import json
import os
import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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


# -----------------------------------------------------------------------------
# LLaVA's preprocess_v1, written independently: the reference for ids and labels

@pytest.fixture(scope="module")
def sentencepiece():
    """A SentencePiece-style tokenizer in memory: a Unigram model trained on a small corpus with a
    Metaspace pre-tokenizer that prefixes "▁" only at the start of the text (transformers'
    non-legacy LLaMA behaviour). As in LLaMA's vocabulary, "USER" is one piece but "▁USER" is not:
    alone "USER" becomes "▁US" "ER", right after </s> it stays "USER"."""
    corpus = (SYSTEM_PROMPT + " USER: What is the colour of the shape? ASSISTANT: The shape is red and round.\n"
              "How many shapes are there? Two. Describe the picture in detail. 1234 apples, 56 pears.\n") * 20
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'\n")
    tok.train_from_iterator([corpus], trainer=trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"], unk_token="<unk>",
        initial_alphabet=alphabet, show_progress=False))
    state = json.loads(tok.to_str())
    vocab = [p for p in state["model"]["vocab"] if "USER" not in p[0] and p[0] not in ("\u2581US", "US", "ER")]
    state["model"]["vocab"] = vocab + [["\u2581US", -1.0], ["ER", -1.0], ["USER", -1.5]]
    tok = Tokenizer.from_str(json.dumps(state))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def llava_v1_reference(tokenizer, turns, n_image, legacy):
    """ids and labels as LLaVA's preprocess_multimodal + conv_vicuna_v1 + tokenizer_image_token +
    preprocess_v1 give them, with the single image placeholder expanded to the n_image tokens HF's
    LLaVA uses. legacy: LLaVA's `tokenizer.legacy`."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    def image_token_ids(prompt):  # each <image>-separated chunk tokenised with BOS, the BOS kept once
        chunks = [tokenizer(c)["input_ids"] for c in prompt.split("<image>")]
        drop = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
        out = chunks[0][:drop]
        for k, chunk in enumerate(chunks):
            out += ([image_id] * n_image if k else []) + chunk[drop:]
        return out

    conversation = SYSTEM_PROMPT + " "
    for t, value in enumerate(turns):
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        conversation += ("USER: " + value + " ") if t % 2 == 0 else ("ASSISTANT: " + value + "</s>")
    ids = image_token_ids(conversation)
    labels = list(ids)
    sep, position = " ASSISTANT: ", 1
    labels[0] = IGNORE
    for r, rou in enumerate(conversation.split("</s>")):
        if rou == "" or len(rou.split(sep)) != 2:
            break
        round_len = len(image_token_ids(rou))
        instruction_len = len(image_token_ids(rou.split(sep)[0] + sep)) - 2
        if r != 0 and not legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        for j in range(position, min(position + instruction_len, len(labels))):
            labels[j] = IGNORE
        position += round_len
    labels[position:] = [IGNORE] * max(len(labels) - position, 0)
    if position != len(ids):
        labels = [IGNORE] * len(ids)  # LLaVA's "tokenization mismatch"
    return ids, labels


CONVERSATIONS = [
    ["What is the colour of the shape?\n<image>", "The shape is red.", "How many shapes are there?", "Two.",
     "Describe the picture in detail.", "1234 apples, 56 pears."],
    ["<image>\nHow many shapes are there?", "12", "What is the colour?", "red\nand round"],
    ["Describe the picture in detail.", "Two shapes.", "<image> What is the colour of the shape?", "red"],
    ["How many apples?", "1234", "And pears?", "56", "What is the colour?", "red"],
]


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_sentencepiece_multiturn_equals_llava_preprocess_v1(sentencepiece, turns):
    tok = sentencepiece
    eos, user = tok.eos_token_id, tok.convert_tokens_to_ids("USER")
    assert tok.convert_ids_to_tokens(tok("USER:", add_special_tokens=False)["input_ids"]) == ["\u2581US", "ER", ":"]
    conv = data.ConversationTokenizer(tok, 5, tok.convert_tokens_to_ids("<image>"))
    ids, labels, truncated = conv(turns, "sp")
    ref_ids, ref_labels = llava_v1_reference(tok, turns, 5, legacy=False)
    assert (ids, labels) == (ref_ids, ref_labels) and not truncated
    # every later turn starts "</s>USER" as LLaVA tokenises the whole string, and each answer with
    # its </s> is supervised (the reference did not fall into its all-masked mismatch case)
    assert sum(a == eos and b == user for a, b in zip(ids, ids[1:])) == len(turns) // 2 - 1
    spans = supervised_spans(ids, labels)
    assert len(spans) == len(turns) // 2 and all(span[-1] == eos for span in spans)
    assert [tok.decode(span[:-1]).strip() for span in spans] == [a.strip() for a in turns[1::2]]
    # the generation prompt is the training prefix
    if "<image>" in turns[0]:
        question = turns[0].replace("<image>", "").strip()
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert conv.encode_prompt(question) == ids[:first]


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_byte_level_bpe_equals_llava_preprocess_v1(processor, conv_tok, turns):
    """The tiny byte-level tokenizer adds no prefix space anywhere (LLaVA's legacy branch)."""
    ids, labels, _ = conv_tok(turns, "bpe")
    assert (ids, labels) == llava_v1_reference(processor.tokenizer, turns, 36, legacy=True)
    assert len(supervised_spans(ids, labels)) == len(turns) // 2


def test_mismatch_is_an_error_not_silence(conv_tok):
    """An answer holding " ASSISTANT: " breaks preprocess_v1's arithmetic (LLaVA masks the sample
    and trains on nothing); here it is an error naming the sample."""
    with pytest.raises(data.BadSampleError, match="sample odd: .*tokenization mismatch"):
        conv_tok(["q", "see ASSISTANT: here"], "odd")


CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml(processor):
    tok = tiny.tiny_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    return tok


def test_chat_template_supervises_answers_and_end_of_turn(chatml):
    tok = chatml
    image_id = tok.convert_tokens_to_ids("<image>")
    conv = data.ConversationTokenizer(tok, 4, image_id, template="chat")
    turns = ["What is the colour of the shape? <image>", "red", "How many shapes are there?", "two shapes"]
    ids, labels, _ = conv(turns, "c1")
    assert [tok.decode(s) for s in supervised_spans(ids, labels)] == ["red<|im_end|>", "two shapes<|im_end|>"]
    text = tok.decode([i for i in ids if i != image_id])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\n"
                    "What is the colour of the shape?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\ntwo shapes<|im_end|>\n")
    first_image = ids.index(image_id)
    assert ids[first_image:first_image + 4] == [image_id] * 4 and tok.decode(ids[:first_image]).endswith("user\n")
    # the generation prompt is the training prefix, and a text-only chat is HF's own tokenisation
    prompt = conv.encode_prompt("What is the colour of the shape?")
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert prompt == ids[:first] and tok.decode(prompt).endswith("<|im_start|>assistant\n")
    text_turns = ["How many shapes are there?", "two shapes"]
    messages = [dict(role="user", content=text_turns[0]), dict(role="assistant", content=text_turns[1])]
    hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert conv(text_turns)[0] == list(hf)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        data.ConversationTokenizer(tiny.tiny_tokenizer(), 4, image_id, template="chat")


# -----------------------------------------------------------------------------
# faults: one bad item costs one item, and the message names the cause

def conversation(sample_id, image=None, question="What is the colour of the shape?", answer="red"):
    entry = dict(id=sample_id, conversations=[{"from": "human", "value": ("<image>\n" if image else "") + question},
                                              {"from": "gpt", "value": answer}])
    if image:
        entry["image"] = image
    return entry


def truncated_images(tmp_path):
    """A PNG and a JPEG cut in half: their headers read, their pixels do not decode."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name in ("cut.png", "cut.jpg"):
        noise.save(tmp_path / name)
        raw = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(raw[:len(raw) // 2])
    noise.save(tmp_path / "ok.png")


def test_undecodable_images_fail_naming_file_or_are_replaced_and_counted(tmp_path, processor):
    truncated_images(tmp_path)
    entries = [conversation(f"good-{i}", "ok.png") for i in range(6)]
    entries[2], entries[4] = conversation("cut-png", "cut.png"), conversation("cut-jpg", "cut.jpg")
    path = write_json(tmp_path / "d.json", entries)
    ds, skipped = data.TrainDataset.from_config(llava_config(tmp_path, path), processor)
    assert skipped == 0  # the headers are fine: the up-front check keeps them
    bad_position = next(p for p in range(len(ds)) if ds.describe(0, p).id == "cut-jpg")
    with pytest.raises(data.BadSampleError, match=f"sample cut-jpg: cannot read image {tmp_path / 'cut.jpg'}.*truncated"):
        ds[(0, bad_position)]
    ds, _ = data.TrainDataset.from_config(llava_config(tmp_path, path, skip_bad_samples=True), processor)
    collate = data.Collator(processor.tokenizer.pad_token_id, carpe.make_image_transform(processor))
    batch = collate([ds[(0, p)] for p in range(len(ds))])
    assert batch.input_ids.shape[0] == 6 and batch.pixel_values.shape[0] == 6  # the batch stays full
    assert sorted(sample_id for sample_id, _ in batch.skipped) == ["cut-jpg", "cut-png"]
    assert all(i.startswith("good-") for i in batch.ids)
    assert any("cut.png" in reason for _, reason in batch.skipped)


def test_junk_image_is_caught_up_front(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 this is not a JPEG at all" * 10)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = write_json(tmp_path / "d.json", [conversation("junk-1", "junk.jpg"), conversation("fine", "ok.png")])
    with pytest.raises(data.BadSampleError, match=f"id junk-1\\): image file {tmp_path / 'junk.jpg'} is not an image"):
        data.ensure_llava_cache(llava_config(tmp_path, path))
    records, skipped = data.load_llava_records(llava_config(tmp_path, path, skip_bad_samples=True))
    assert len(records) == 1 and skipped.ids == ["junk-1"]


def test_text_that_is_not_utf8_names_file_and_entry(tmp_path):
    good = json.dumps(conversation("fine"))
    surrogate = good.replace('"fine"', '"lone"').replace("red", "re\\ud800d")  # valid JSON, invalid text
    (tmp_path / "s.json").write_text(f"[{good}, {surrogate}]")
    latin1 = f"[{good}, {good.replace('fine', 'caf-latin1').replace('red', 'rouge')}]".encode()
    (tmp_path / "l.json").write_bytes(latin1.replace(b"rouge", "rougé".encode("latin-1")))
    for name, sample_id in [("s.json", "lone"), ("l.json", "caf-latin1")]:
        with pytest.raises(data.BadSampleError) as e:
            data.ensure_llava_cache(llava_config(tmp_path, tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and f"entry 1 (id {sample_id}): turn 1 holds text that is not UTF-8" in str(e.value)
        records, skipped = data.load_llava_records(llava_config(tmp_path, tmp_path / name, skip_bad_samples=True))
        assert [r[0] for r in records] == ["fine"] and skipped.ids == [sample_id]
    (tmp_path / "broken.json").write_text(f"[{good}, {good}, {{\"id\": \"x\" \"conversations\": []}}, {good}]")
    with pytest.raises(data.BadSampleError, match="broken.json: not valid JSON at entry 2"):
        data.ensure_llava_cache(llava_config(tmp_path, tmp_path / "broken.json"))


def test_over_long_samples_fail_or_are_replaced(tmp_path, processor):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    question = "What is the colour of the shape?"
    image_late = dict(id="image-cut", image="ok.png", conversations=[
        {"from": "human", "value": question * 5}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "red"}])
    entries = [conversation("short", "ok.png"), image_late, conversation("no-answer-left", question=question * 60),
               conversation("short-2")]
    path = write_json(tmp_path / "d.json", entries)
    # 120 tokens: "short" (111) and "short-2" (73) fit; the image of the second turn starts past 120
    config = llava_config(tmp_path, path, model_max_length=120)
    ds, _ = data.TrainDataset.from_config(config, processor)
    positions = {ds.describe(0, p).id: p for p in range(len(ds))}
    with pytest.raises(data.BadSampleError, match="sample no-answer-left: no supervised token left after cutting"):
        ds[(0, positions["no-answer-left"])]
    with pytest.raises(data.BadSampleError, match="sample image-cut: cutting it to model_max_length=120 would cut its image"):
        ds[(0, positions["image-cut"])]
    config.skip_bad_samples = True
    ds, _ = data.TrainDataset.from_config(config, processor)
    samples = [ds[(0, p)] for p in range(len(ds))]
    assert sorted(sample_id for s in samples for sample_id, _ in s.skipped) == ["image-cut", "no-answer-left"]
    assert {s.id for s in samples} == {"short", "short-2"} and len(samples) == 4
    assert all(any(label != IGNORE for label in s.labels) for s in samples)
    config.model_max_length = 30  # nothing fits: the loader gives up with the cause instead of looping
    ds, _ = data.TrainDataset.from_config(config, processor)
    with pytest.raises(data.BadSampleError, match="4 bad samples in a row .*no supervised token left"):
        ds[(0, 0)]


# -----------------------------------------------------------------------------
# the LLaVA json cache

def test_streaming_reader_equals_json_load(tmp_path):
    entries = [conversation(f"e{i}", answer="réponse ✓ " * i + "🙂", question="Q" * (i * 7 % 50) + "?") for i in range(40)]
    entries.append(dict(id=3, nested=[{"a": [1, 2.5, None, True]}], conversations=[]))
    path = tmp_path / "d.json"
    path.write_text(json.dumps(entries, indent=2, ensure_ascii=False))
    for chunk in (1, 7, 64, 1 << 20):  # chunk edges fall inside multi-byte characters and entries
        assert list(data.JsonListReader(str(path), chunk_bytes=chunk)) == entries
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert list(data.JsonListReader(str(tmp_path / "empty.json"))) == []
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(data.BadSampleError, match="obj.json: expected a JSON list"):
        list(data.JsonListReader(str(tmp_path / "obj.json")))
    for text, why in [("[1, 2", "entry 2"), ("[1 2]", "expected ',' or ']' after entry 0"), ("[1,]", "entry 1"),
                      ("[1] x", "text after")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(data.BadSampleError, match=f"bad.json: not valid JSON at {why}|bad.json: .*{why}"):
            list(data.JsonListReader(str(tmp_path / "bad.json"), chunk_bytes=2))


def test_cache_built_once_keyed_and_mapped(tmp_path, processor, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    entries = [conversation(f"s{i}", "ok.png" if i % 2 else None, answer=f"answer {i}") for i in range(50)]
    path = write_json(tmp_path / "d.json", entries)
    config = llava_config(tmp_path, path)
    folder = data.ensure_llava_cache(config)
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(folder)]  # no temporary folder left
    # every later load (another rank, a resume) maps the files and checks nothing
    monkeypatch.setattr(data, "pack_llava_json", lambda *a, **k: pytest.fail("the json was packed twice"))
    ds, skipped = data.TrainDataset.from_config(config, processor)
    assert skipped == 0 and isinstance(ds.llava.buffer, np.memmap) and len(ds.llava) == 50
    assert [ds.llava[i][0] for i in range(50)] == [e["id"] for e in entries]
    assert ds.llava[3] == ["s3", "ok.png", ["<image>\nWhat is the colour of the shape?", "answer 3"]]
    assert len(pickle.dumps(ds.llava)) < 500 and pickle.loads(pickle.dumps(ds.llava))[7] == ds.llava[7]  # by path
    monkeypatch.undo()
    del ds  # this "job" ends: its pack is no longer mapped
    # the key: a changed file, another image root or another skip setting is another cache
    assert data.ensure_llava_cache(llava_config(tmp_path, path, skip_bad_samples=True)) != folder
    skip_folder = data.ensure_llava_cache(llava_config(tmp_path, path, skip_bad_samples=True))
    other = write_json(tmp_path / "other.json", entries[:3])
    other_folder = data.ensure_llava_cache(llava_config(tmp_path, other))
    os.utime(path, ns=(1, 1))  # the json edited in place: its packs of the old state are removed, nothing else
    edited = data.ensure_llava_cache(config)
    assert edited != folder and not os.path.exists(folder) and not os.path.exists(skip_folder)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(os.path.basename(f) for f in (edited, other_folder))
    # ... unless a job still maps one: a running job's workers re-open its pack by path
    mapped = data.PackedRecords.open(edited)
    os.utime(path, ns=(2, 2))
    newest = data.ensure_llava_cache(config)
    assert os.path.isdir(edited) and pickle.loads(pickle.dumps(mapped))[3] == mapped[3]
    del mapped  # the job ends (its lock with it): the next build removes both older packs
    os.utime(path, ns=(3, 3))
    latest = data.ensure_llava_cache(config)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(os.path.basename(f) for f in (latest, other_folder))
    assert newest != latest
    # a folder that cannot be written is named with the flag to change
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.raises(data.BadSampleError, match="cannot write the LLaVA json cache under .*file-not-dir.*--cache-dir"):
        data.ensure_llava_cache(data.DataConfig(llava_json=path, image_root=str(tmp_path), cache_dir=str(blocked / "x")))


def test_skip_report_summary():
    report = data.SkipReport()
    for i in range(7):
        report.add(f"s{i}", f"reason {i}")
    assert len(report) == 7 and report.ids[:2] == ["s0", "s1"]
    assert report.summary(2) == "s0: reason 0\n  s1: reason 1\n  ... and 5 more"


def tiny_imagenet(root, n_per_class=2):
    """An ImageFolder with two classes and its class-name file."""
    for c in ("circle", "square"):
        os.makedirs(root / "train" / c)
        for i in range(n_per_class):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "train" / c / f"{i}.png")
    (root / "classnames.txt").write_text("circle\nsquare\n")
    return str(root)


def test_mix_that_cannot_be_honoured_is_an_error_naming_file_counts_and_ratio(tmp_path, processor):
    """An empty json, or one whose every entry --skip-bad-samples drops, used to train an ImageNet-only
    run under a 1:1 mix without a word; a ratio that rounds the ImageNet side to 0 a LLaVA-only run."""
    imagenet = tiny_imagenet(tmp_path / "imagenet")
    empty = write_json(tmp_path / "empty.json", [])
    config = llava_config(tmp_path, empty, imagenet=imagenet, mix=(1, 1))
    with pytest.raises(data.BadSampleError, match=f"--data {empty} holds no entries.*--mix 1:1"):
        data.TrainDataset.from_config(config, processor)
    bad = [conversation(f"gone-{i}", "missing.png") for i in range(7)]
    all_bad = write_json(tmp_path / "all_bad.json", bad)
    with pytest.raises(data.BadSampleError) as e:
        data.TrainDataset.from_config(llava_config(tmp_path, all_bad, imagenet=imagenet, mix=(1, 1),
                                                   skip_bad_samples=True), processor)
    msg = str(e.value)
    assert f"--data {all_bad}: all 7 entries were dropped by --skip-bad-samples" in msg and "--mix 1:1" in msg
    assert "gone-0: entry 0: image file" in msg and "missing.png does not exist" in msg and "and 2 more" in msg
    three = write_json(tmp_path / "three.json", [conversation(f"t{i}") for i in range(3)])
    with pytest.raises(data.BadSampleError, match=r"--mix 1:7 with 3 LLaVA entries gives round\(3 \* 1 / 7\) = 0 "
                                                  r"ImageNet samples per epoch, though --imagenet .* holds 4 images"):
        data.TrainDataset.from_config(llava_config(tmp_path, three, imagenet=imagenet), processor)
    with pytest.raises(data.BadSampleError, match="--mix 1:0 leaves no LLaVA sample per epoch.*3 entries"):
        data.TrainDataset.from_config(llava_config(tmp_path, three, imagenet=imagenet, mix=(1, 0)), processor)
    # what can be honoured still trains: 3 LLaVA entries at 1:1 take 3 ImageNet samples, and a json
    # without --imagenet (a side left out on purpose) is all LLaVA
    ds, _ = data.TrainDataset.from_config(llava_config(tmp_path, three, imagenet=imagenet, mix=(1, 1)), processor)
    assert (ds.plan.n_llava, ds.plan.imagenet_per_epoch) == (3, 3)
    ds, _ = data.TrainDataset.from_config(llava_config(tmp_path, three), processor)
    assert (ds.plan.n_llava, ds.plan.imagenet_per_epoch) == (3, 0)


def test_every_image_mode_decodes_to_its_picture(tmp_path):
    """convert("RGB") turned a 16-bit PNG all white and clipped 32-bit and float pictures; each mode
    Pillow writes now decodes to its picture (a gradient stays that gradient), through files."""
    g = np.tile(np.linspace(0, 1, 64), (4, 1))  # (4, 64) left-to-right ramp
    g8 = np.rint(g * 255).astype(np.uint8)
    gray = np.stack([g8] * 3, -1)  # the ramp as an RGB picture

    def decoded(im, ext, **save):
        path = tmp_path / f"{im.mode.replace(';', '_')}-{len(os.listdir(tmp_path))}.{ext}"
        im.save(path, **save)
        return np.asarray(data.load_image(str(path)), dtype=np.int64)

    palette = Image.fromarray(g8, "P")
    palette.putpalette([c for i in range(256) for c in (i, 255 - i, 40)])
    wanted = np.stack([g8, 255 - g8, np.full_like(g8, 40)], -1)
    exact = [  # (image, file type, the RGB picture it must decode to)
        (Image.fromarray(g8, "L"), "png", gray),
        (Image.fromarray(g8 > 127), "png", np.stack([(g8 > 127) * 255] * 3, -1)),  # mode 1
        (palette, "png", wanted),
        (Image.fromarray(np.stack([g8, 255 - g8], -1), "LA"), "png", gray),
        (Image.fromarray(np.dstack([wanted, g8]), "RGBA"), "png", wanted),  # alpha dropped, as LLaVA
        (Image.fromarray(np.stack([np.zeros_like(g8), g8, g8 * 0, g8 * 0], -1), "CMYK"), "tif",
         np.stack([np.full_like(g8, 255), 255 - g8, np.full_like(g8, 255)], -1)),
        (Image.fromarray(np.rint(g * 65535).astype(np.uint16)), "png", gray),  # I;16: was all white
        (Image.fromarray(np.rint(g * 65535).astype(np.uint16)), "tif", gray),
        (Image.frombytes("I;16B", (64, 4), np.rint(g * 65535).astype(">u2").tobytes()), "tif", gray),
        (Image.fromarray(np.rint(g * 65535).astype(np.int32)), "tif", gray),  # I holding 16-bit values
        (Image.fromarray(g8.astype(np.int32) - 1000), "tif", gray),  # I, another range: stretched
        (Image.fromarray(g.astype(np.float32)), "tif", gray),  # F in [0, 1]
        (Image.fromarray(g8.astype(np.float32)), "tif", gray),  # F holding 8-bit values
        (Image.fromarray((g * 4 - 1).astype(np.float32)), "tif", gray),  # F, another range: stretched
        (Image.fromarray(wanted, "RGB").convert("RGBX"), "tif", wanted),
    ]
    for im, ext, want in exact:
        assert im.mode != "RGB"
        got = decoded(im, ext)
        assert np.abs(got - want).max() <= 1, (im.mode, ext, np.abs(got - want).max())
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    assert (decoded(transparent, "png") == wanted).all()  # P with transparency: its palette's colours
    for im, tolerance in [(Image.fromarray(gray, "RGB").convert("YCbCr"), 2),
                          (Image.fromarray(gray, "RGB").convert("LAB"), 12)]:  # colour conversions, by Pillow
        got = decoded(im, "tif")
        assert np.abs(got - gray).max() <= tolerance and (np.diff(got[..., 0], axis=1) >= 0).all(), im.mode
    # modes Pillow makes but does not write to a file, as `ask` may be given them
    assert np.abs(data.load_image(Image.fromarray(gray, "RGB").convert("HSV")) - gray).max() <= 1
    ramp16 = np.rint(g * 65535).astype("<u2").tobytes()
    for mode in ("I;16L", "I;16N"):
        assert np.abs(np.asarray(data.load_image(Image.frombytes(mode, (64, 4), ramp16)), int) - gray).max() <= 1, mode
    opaque = np.full_like(g8, 255)
    assert (np.asarray(data.load_image(Image.fromarray(np.stack([g8, opaque], -1), "LA").convert("La"))) == gray).all()
    assert (np.asarray(data.load_image(Image.fromarray(np.dstack([wanted, opaque]), "RGBA").convert("RGBa"))) == wanted).all()
    assert (np.asarray(data.load_image(palette.convert("PA"))) == wanted).all()
    # a picture that cannot be decoded costs that item, named
    with pytest.raises(data.BadSampleError, match=r"sample s7: cannot read image .*nan\.tif.*NaN or inf"):
        path = tmp_path / "nan.tif"
        Image.fromarray(np.where(g > 0.5, np.nan, g).astype(np.float32)).save(path)
        data.load_image(str(path), "s7")
    truncated_images(tmp_path)
    with pytest.raises(data.BadSampleError, match=r"sample s8: cannot read image \S*cut\.png: OSError"):
        data.load_image(str(tmp_path / "cut.png"), "s8")
    # EXIF orientation is ignored, as LLaVA's loader ignores it: the stored pixels come back
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.fromarray(wanted, "RGB").save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    assert data.load_image(str(tmp_path / "rotated.jpg")).size == (64, 4)
