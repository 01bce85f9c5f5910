"""
lmms_carpe.py: a CARPE run as an lmms-eval model (the harness most groups run), an optional extra.
The project never imports this file; lmms-eval lives in its own environment:

    python -m venv --system-site-packages .venv-lmms                 # reuses this install's torch
    .venv-lmms/bin/pip install -r requirements-lmms.txt
    .venv-lmms/bin/pip uninstall -y torchvision                      # why: requirements-lmms.txt
    .venv-lmms/bin/python lmms_carpe.py register                     # lmms-eval now knows --model carpe
    .venv-lmms/bin/lmms-eval --model carpe --model_args pretrained=runs/carpe --tasks pope --batch_size 8
    # (lmms-eval's own tasks fetch their data from the Hub; a local task over eval.py's items:)
    .venv-lmms/bin/python lmms_carpe.py task --bench imagenet --data-root .cache/tiny-eval-data --out lmms_tasks
    .venv-lmms/bin/lmms-eval --model carpe --model_args pretrained=runs/tiny \\
        --include_path lmms_tasks --tasks carpe_imagenet --output_path lmms_out --log_samples

The model (CarpeLmms, lmms-eval's "simple" API) loads any run pretrained.load reads (a run folder,
a moved copy, a Hub id: CARPE, CARPE-MoE or a baseline) and answers through model.ask, so each
prompt and image goes through the run's own template and LLaVA's pad-to-square transform, as in
training and eval.py. model_args: pretrained (required), device (default cuda if there, else cpu),
dtype (float32, float16, bfloat16 or auto; default: pretrained.load's), batch_size, max_new_tokens
(when a task sets none), base (load on another base folder or Hub id).
  - generate_until: greedy (CARPE's generate); a task's `until` strings cut the answer; sampling
    settings (temperature > 0, num_beams > 1) are refused, since the answers would not be what
    they say. A request with several images answers "" and is logged (CARPE reads one image).
  - loglikelihood: -log p(continuation | prompt), summed over the continuation's tokens, and
    whether greedy decoding gives it, from one forward pass whose context pass reads the prompt
    alone, as generation's does. The sign is lmms-eval's working convention, not its docstring's:
    its multiple_choice scorer takes the argmin (its own LLaVA models return the loss). The
    continuation is appended to the prompt's text and the two tokenised together (lm-eval's
    convention: a task gives " answer" with its space).
  - generate_until_multi_round: not supported (NotImplementedError).
  - one process (a GPU or the CPU); lmms-eval's data-parallel launch is not supported.

`register` makes --model carpe known to lmms-eval through its `lmms_eval.models` entry-point group:
it writes what `pip install -e` would (a carpe_lmms-*.dist-info with entry_points.txt, and a .pth
naming this checkout) into the environment's site-packages; `pip uninstall carpe-lmms` removes it.
(`@register_model` alone is not enough in lmms-eval 0.7: its registry reads entry points.)

`task` writes an lmms-eval task (a YAML and a JSONL of items, `dataset_path: json`) over the items
benchmarks.py reads for eval.py: the same prompts and images, each with one reference answer
(a class name, yes/no, an option letter), scored by lmms-eval's own exact_match (case and
punctuation ignored). eval.py's `--match exact` is the same rule on its side; the official
scores (substring rule, POPE F1, ...) stay eval.py's.
"""
import argparse
import json
import os
import sys
import sysconfig

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from pretrained import as_image, conversation_tokenizer, load, to_device
from benchmarks import BENCHMARKS
from carpe import CARPE
from data import IMAGE_TAG, move_image_tag_first, vicuna_prompt

REPO = os.path.dirname(os.path.abspath(__file__))
MODEL_NAME = "carpe"
DIST_NAME, DIST_VERSION = "carpe_lmms", "0.1.0"


def manifests():
    """The entry point lmms-eval loads on every run: a manifest naming the class, nothing imported."""
    return [ModelManifest(model_id=MODEL_NAME, simple_class_path="lmms_carpe.CarpeLmms")]


def warn(message):
    print(f"lmms_carpe: {message}", file=sys.stderr)


# -----------------------------------------------------------------------------
# the model

class CarpeLmms(lmms):
    """lmms-eval's simple-model API over pretrained.load and model.ask."""

    def __init__(self, pretrained=None, device=None, dtype=None, batch_size=1, max_new_tokens=128, base=None,
                 max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args: unknown argument(s) {sorted(unknown)} for --model {MODEL_NAME} "
                             f"(known: pretrained, device, dtype, batch_size, max_new_tokens, base)")
        if not pretrained:
            raise ValueError(f"--model {MODEL_NAME} needs --model_args pretrained=RUN (a run folder or Hub id)")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError(f"--model {MODEL_NAME} runs in one process; launch lmms-eval without accelerate/torchrun")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load(str(pretrained), device=self._device, dtype=dtype, base=base)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(f"--model_args batch_size and max_new_tokens must be at least 1, got "
                             f"{batch_size} and {max_new_tokens}")
        self.conversation = conversation_tokenizer(self.model)

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def request_inputs(self, request):
        """-> (question, image or None, gen_kwargs or continuation) of one lmms-eval request;
        image is "" for a request CARPE cannot read (several images)."""
        context, second, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            warn(f"{task} doc {doc_id}: {len(visuals)} images, CARPE reads one per prompt; answered \"\"")
            return context, "", second
        # the run's template places the image itself (eval.py's questions carry no tag); a tag left
        # in the text would become image tokens without an image
        question = context.replace(IMAGE_TAG, "").strip() if IMAGE_TAG in context else context
        return question, (visuals[0] if visuals else None), second

    def generate_until(self, requests):
        inputs = [self.request_inputs(r) for r in requests]
        answers = [""] * len(requests)
        # batches of consecutive requests with the same answer length, in request order
        batches = []
        for n, (_, image, gen_kwargs) in enumerate(inputs):
            if image == "":  # unreadable for CARPE: answered "" (logged)
                continue
            length = self.generation_length(gen_kwargs)
            if not batches or len(batches[-1][1]) == self.batch_size or batches[-1][0] != length:
                batches.append((length, []))
            batches[-1][1].append(n)
        for length, batch in tqdm(batches, desc="carpe generate_until"):
            out = self.model.ask([inputs[n][1] for n in batch], [inputs[n][0] for n in batch], max_new_tokens=length)
            for n, answer in zip(batch, out):
                answers[n] = cut_at(answer, inputs[n][2].get("until"))
                self.cache_hook.add_partial("generate_until", (requests[n].args[0], inputs[n][2]), answers[n])
        return answers

    def generation_length(self, gen_kwargs):
        """max_new_tokens of a request; sampling settings are refused (CARPE generates greedily)."""
        if float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample") \
                or int(gen_kwargs.get("num_beams") or 1) > 1:
            raise ValueError(f"--model {MODEL_NAME} generates greedily; the task asks for temperature="
                             f"{gen_kwargs.get('temperature')}, do_sample={gen_kwargs.get('do_sample')}, "
                             f"num_beams={gen_kwargs.get('num_beams')}")
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)

    def loglikelihood(self, requests):
        results = []
        for request in tqdm(requests, desc="carpe loglikelihood"):
            question, image, target = self.request_inputs(request)
            if image == "":  # several images: logged in request_inputs
                results.append((float("inf"), False))
                continue
            if not isinstance(target, str):  # a function of the doc
                _, _, _, doc_id, task, split = request.args
                target = target(self.task_dict[task][split][doc_id])
            results.append(self.continuation_nll(question, image, target))
        # lmms-eval 0.7.3's evaluator turns any other output into its str() (api/instance.py,
        # unwrap_generation_output), which breaks every multiple_choice task; its own
        # GenerationResult passes the (nll, is_greedy) pair through unchanged
        return [GenerationResult(text=pair) for pair in results]

    @torch.no_grad()
    def continuation_nll(self, question, image, continuation):
        """(-log p of the continuation's tokens, summed; whether greedy decoding gives them)."""
        has_image = image is not None
        prompt = self.conversation.encode_prompt(question, has_image=has_image)
        full = self.encode_with_continuation(question, continuation, has_image)
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise ValueError(f"loglikelihood: the continuation {continuation!r} does not tokenise after the prompt "
                             f"(it merges with the prompt's last token, or is empty)")
        model, device = self.model, self._device
        ids = torch.tensor([full], device=device)  # (1, T)
        kwargs = {}
        if isinstance(model, CARPE):  # the context pass reads the prompt alone, as generate's does
            kwargs["context_mask"] = torch.arange(len(full), device=device)[None] < len(prompt)  # (1, T)
        pixel_values = None
        if has_image:
            dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
            pil = as_image(image, "loglikelihood image")
            pixel_values = to_device(model.image_transform([pil]), device, dtype)
        out = model(ids, torch.ones_like(ids), pixel_values, **kwargs)
        logits = out.logits[0, len(prompt) - 1:-1].float()  # (n, V): the predictions of the continuation
        target = ids[0, len(prompt):]  # (n,)
        logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
        return -float(logprob), bool((logits.argmax(-1) == target).all())

    def encode_with_continuation(self, question, continuation, has_image):
        """The prompt's text with the continuation appended, tokenised as one string (ids incl. BOS)."""
        conv = self.conversation
        if conv.template == "chat":
            content = move_image_tag_first(IMAGE_TAG + question) if has_image else question
            return conv.encode(conv.render_chat([content], generation_prompt=True) + continuation)
        return [conv.tokenizer.bos_token_id] + conv.encode(vicuna_prompt(question, has_image) + continuation)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"--model {MODEL_NAME}: multi-round generation is not supported")


def cut_at(text, until):
    """The answer up to the first of the task's stop strings."""
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


# -----------------------------------------------------------------------------
# register: the entry point, as an editable install writes it

def register(site_dir=None):
    """Write carpe_lmms-<version>.dist-info (METADATA, entry_points.txt, RECORD) and carpe_lmms.pth
    (this checkout's folder) into site_dir (default: this interpreter's site-packages)."""
    site_dir = site_dir or sysconfig.get_paths()["purelib"]
    info = os.path.join(site_dir, f"{DIST_NAME}-{DIST_VERSION}.dist-info")
    os.makedirs(info, exist_ok=True)
    files = {
        os.path.join(info, "METADATA"): f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {DIST_VERSION}\n"
                                         f"Summary: CARPE runs as an lmms-eval model (lmms_carpe.py in {REPO})\n",
        os.path.join(info, "entry_points.txt"): f"[lmms_eval.models]\n{MODEL_NAME} = lmms_carpe:manifests\n",
        os.path.join(info, "INSTALLER"): "lmms_carpe.py\n",
        os.path.join(site_dir, f"{DIST_NAME}.pth"): REPO + "\n",  # the checkout's modules become importable
    }
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
    record = [os.path.relpath(p, site_dir) + ",," for p in files] + [os.path.relpath(info, site_dir) + "/RECORD,,"]
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write("\n".join(record) + "\n")
    print(f"registered --model {MODEL_NAME} (lmms_carpe.py in {REPO}) in {site_dir}; undo: pip uninstall {DIST_NAME}")
    return info


# -----------------------------------------------------------------------------
# task: eval.py's items as an lmms-eval task

def reference_answer(bench, item):
    for key in ("label", "gt"):
        if isinstance(item.meta.get(key), str):
            return item.meta[key]
    raise SystemExit(f"task: {bench} has no single reference answer per item (it is scored by its official "
                     f"script only); use eval.py --bench {bench}")


def write_task(bench_name, data_root, out_dir, world="open", closed_k=None, max_new_tokens=None, limit=None,
               choices=False):
    """out_dir/<task>.yaml + .jsonl over benchmarks.py's items. -> the task's name. choices: a
    multiple_choice task instead (lmms-eval ranks the benchmark's reference answers by
    loglikelihood; e.g. the class names), named carpe_<bench>_choice."""
    if bench_name not in BENCHMARKS:
        raise SystemExit(f"task: unknown --bench {bench_name}; one of {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[bench_name]
    try:
        items = bench.read(data_root, world=world, closed_k=closed_k)[:limit]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"task: {e}")
    if not items:
        raise SystemExit(f"task: no {bench_name} items under {data_root}")
    name = f"carpe_{bench_name}" + ("_choice" if choices else "")
    rows = []
    for item in items:
        if not isinstance(item.image, str):
            raise SystemExit(f"task: {bench_name} item {item.id}: the image is embedded in the benchmark file; "
                             f"only benchmarks with image files are written")
        rows.append(dict(id=item.id, question=item.question, image=os.path.abspath(item.image),
                         answer=reference_answer(bench_name, item)))
    task = dict(task=name, dataset_path="json", test_split="test", doc_to_visual="image", doc_to_text="question",
                metadata=dict(version=0, source=f"benchmarks.py {bench_name} under {os.path.abspath(data_root)}"))
    if choices:  # every reference answer of the benchmark is a choice; lmms-eval adds " " before each
        names = sorted({r["answer"] for r in rows})
        for r in rows:
            r.update(choices=names, answer_index=names.index(r["answer"]))
        task.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="answer_index",
                    metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True)])
    else:
        task.update(output_type="generate_until", doc_to_target="answer",
                    generation_kwargs=dict(max_new_tokens=max_new_tokens or bench.max_new_tokens, until=[],
                                           temperature=0, do_sample=False),
                    metric_list=[dict(metric="exact_match", aggregation="mean", higher_is_better=True,
                                      ignore_case=True, ignore_punctuation=True)])
    os.makedirs(out_dir, exist_ok=True)
    data_path = os.path.abspath(os.path.join(out_dir, f"{name}.jsonl"))
    with open(data_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    task["dataset_kwargs"] = dict(data_files=dict(test=data_path))
    with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
        json.dump(task, f, indent=1)  # JSON is YAML; no YAML writer needed
    print(f"wrote {name}: {len(rows)} items in {data_path}")
    return name


def main(argv=None):
    p = argparse.ArgumentParser(description="CARPE runs in lmms-eval: register the model, write a local task.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="make --model carpe known to this environment's lmms-eval (entry point)")
    r.add_argument("--site", default=None, help="folder to write the entry point into (default: site-packages)")
    t = sub.add_parser("task", help="write an lmms-eval task over a benchmarks.py benchmark's items")
    t.add_argument("--bench", required=True,
                   help="a benchmark with one reference answer per item (imagenet, pope, mme, sqa, ...)")
    t.add_argument("--data-root", required=True,
                   help="eval.py's --data-root (the tiny benchmarks: .cache/tiny-eval-data, drawn by eval.py "
                   "--preset tiny)")
    t.add_argument("--out", required=True, help="folder for <task>.yaml and <task>.jsonl (lmms-eval --include_path)")
    t.add_argument("--world", default="open", choices=["open", "closed"], help="classification prompts, as eval.py")
    t.add_argument("--closed-k", type=int, default=None, help="closed world: candidates listed, as eval.py")
    t.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the benchmark's)")
    t.add_argument("--limit", type=int, default=None, help="the first N items only")
    t.add_argument("--choices", action="store_true", help="a multiple_choice task (scored through loglikelihood) "
                   "over the benchmark's reference answers, named carpe_<bench>_choice")
    args = p.parse_args(argv)
    if args.command == "register":
        register(args.site)
    else:
        write_task(args.bench, args.data_root, args.out, args.world, args.closed_k, args.max_new_tokens, args.limit,
                   args.choices)


if __name__ == "__main__":
    main(sys.argv[1:])
