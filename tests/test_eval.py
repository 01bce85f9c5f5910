"""Tests for eval.py (and tiny.py's benchmark folders): end-to-end runs of `eval.py --preset tiny`
over synthetic copies of every benchmark's release format: outputs, resume after a crash (torn
line cut in place, predictions read once, nothing rewritten), torchrun sharding, injected faults
(other weights or dtype in the same --out, a corrupt image, broken base64, an empty benchmark,
non-finite weights, a kill while drawing the tiny benchmarks, a closed-world prompt longer than
the model's positions), WiSE-FT, CARPE-MoE routing by expert name, --compile, the comparison
table, and the tiny training run beating chance."""
import collections
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models; threads only fight the other test processes

import baselines  # noqa: E402
import benchmarks as B  # noqa: E402
import carpe  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import eval as E  # noqa: E402
import kernels  # noqa: E402
import moe  # noqa: E402
import tiny  # noqa: E402


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


def listing(folder):
    """A folder's files without the lock file eval.py keeps there."""
    return sorted(n for n in os.listdir(folder) if n != ".lock")


def tiny_flags(data_root, out, *extra):
    return ["--preset", "tiny", "--base", "tiny", "--data-root", data_root, "--out", out, *extra]


# -----------------------------------------------------------------------------
# end to end on synthetic copies of every benchmark

def test_end_to_end_writes_every_output(full_eval, tiny_data):
    for name in B.BENCH_GROUPS["all"]:
        bench = B.BENCHMARKS[name]
        items = bench.read(tiny_data)
        preds = read_jsonl(os.path.join(full_eval, name, "predictions.jsonl"))
        assert [p["id"] for p in preds] == [it.id for it in items], name
        # a line identifies its prompt by a digest; the question text itself is never stored
        assert all("question" not in p and p["prompt"] == E.short_digest(it.question) for p, it in zip(preds, items))
        with open(os.path.join(full_eval, name, "metrics.json")) as f:
            m = json.load(f)
        assert m["n"] == len(items) and m["bench"] == name and m["n_failed"] == 0 and m["headline"] is not None
        # vanilla LLaVA: the whole weight is on the language side
        assert m["context_weights"] == dict(vision=0.0, language=1.0) and m["routing"] is None
        # metrics are the scorer applied to the predictions file
        assert m["headline"] == bench.score(preds)["headline"]
        with open(os.path.join(full_eval, name, "run.json")) as f:
            run = json.load(f)
        assert run["model"]["dtype"] == "float32" and len(run["model"]["weights"]) == 64
    with open(os.path.join(full_eval, "summary.md")) as f:
        md = f.read()
    assert "Table 2" in md and "Table 3" in md and "| llava |" in md
    assert not [n for n in os.listdir(full_eval) if n.endswith(".tmp")]  # atomic writes left nothing behind


def test_closed_world_lines_stay_short(tiny_data, tmp_path):
    """Closed-world ImageNet wrote the whole candidate list into every line; now the id and run.json's
    world / closed_k rebuild the prompt, and the line holds a digest of it."""
    out = str(tmp_path / "closed")
    E.main(["--bench", "imagenet", "--world", "closed", *tiny_flags(tiny_data, out)])
    items = B.BENCHMARKS["imagenet"].read(tiny_data, world="closed")
    preds = read_jsonl(os.path.join(out, "imagenet", "predictions.jsonl"))
    assert all(p["prompt"] == E.short_digest(it.question) for p, it in zip(preds, items))
    assert all("Choose one from" not in json.dumps(p) for p in preds)
    with open(os.path.join(out, "imagenet", "run.json")) as f:
        assert json.load(f)["world"] == "closed"


def test_resume_cuts_torn_line_in_place_and_reads_once(full_eval, tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / "resume")
    args = ["--bench", "mme", *tiny_flags(tiny_data, out)]
    E.main(args + ["--limit", "5"])
    path = os.path.join(out, "mme", "predictions.jsonl")
    assert len(read_jsonl(path)) == 5
    with open(path) as f:  # a crash mid-write: the file ends in a torn line
        text = f.read()
    with open(path, "r+") as f:
        f.truncate(len(text) - 40)
    inode = os.stat(path).st_ino
    generated, reads = [], []
    real_generate, real_read = E.generate_records, E.read_predictions

    def counting_generate(loaded, batches, *a):
        generated.extend(it.id for b in batches for it in b)
        return real_generate(loaded, batches, *a)

    def counting_read(p):
        reads.append(os.path.basename(p))
        return real_read(p)
    monkeypatch.setattr(E, "generate_records", counting_generate)
    monkeypatch.setattr(E, "read_predictions", counting_read)
    E.main(args)
    items = B.BENCHMARKS["mme"].read(tiny_data)
    preds = read_jsonl(path)
    assert [p["id"] for p in preds] == [it.id for it in items]  # complete, in order, no duplicates
    assert len(generated) == len(items) - 4  # the 4 intact lines were not generated again
    assert reads == ["predictions.jsonl"]  # read once
    assert os.stat(path).st_ino == inode  # cut and appended in place, never rewritten
    reference = {p["id"]: p["answer"] for p in read_jsonl(os.path.join(full_eval, "mme", "predictions.jsonl"))}
    assert {p["id"]: p["answer"] for p in preds} == reference
    # a finished run generates nothing and writes nothing to the predictions
    generated.clear()
    before = (os.stat(path).st_mtime_ns, os.stat(path).st_size)
    E.main(args)
    assert generated == [] and (os.stat(path).st_mtime_ns, os.stat(path).st_size) == before
    with pytest.raises(E.EvalError, match="max_new_tokens=8.*max_new_tokens=3"):  # another prompt setting
        E.main(args + ["--max-new-tokens", "3"])


def test_torchrun_sharded_equals_single_process(full_eval, tiny_data, tmp_path):
    out = str(tmp_path / "sharded")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "eval.py"), "--bench", "mme,mmbench,imagenet,mmvp", *tiny_flags(tiny_data, out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for bench in ("mme", "mmbench", "imagenet", "mmvp"):  # mmvp: one batch, so rank 1 generates nothing
        assert listing(os.path.join(out, bench)) == ["metrics.json", "predictions.jsonl", "run.json"]
        sharded = read_jsonl(os.path.join(out, bench, "predictions.jsonl"))
        single = read_jsonl(os.path.join(full_eval, bench, "predictions.jsonl"))
        assert [(p["id"], p["answer"]) for p in sharded] == [(p["id"], p["answer"]) for p in single], bench
        with open(os.path.join(out, bench, "metrics.json")) as f, open(os.path.join(full_eval, bench, "metrics.json")) as g:
            assert json.load(f)["headline"] == json.load(g)["headline"]


def test_rank_files_of_a_crashed_sharded_run_are_absorbed(tiny_data, tmp_path):
    """A sharded run killed before rank 0 merged: the ranks' lines are appended (once, even if the
    merge is repeated after a crash between append and removal) and only the rest is generated."""
    out = str(tmp_path / "crashed")
    args = ["--bench", "mmvp", *tiny_flags(tiny_data, out)]
    E.main(args)
    bench_dir = os.path.join(out, "mmvp")
    lines = read_jsonl(os.path.join(bench_dir, "predictions.jsonl"))
    with open(os.path.join(bench_dir, "predictions.jsonl"), "w") as f:  # rank 0 had merged item 0 already ...
        f.write(json.dumps(lines[0]) + "\n")
    for rank, part in enumerate((lines[:2], lines[2:3])):  # ... and rank 1's file holds item 2
        with open(os.path.join(bench_dir, f"predictions.rank{rank}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    E.main(args)
    assert read_jsonl(os.path.join(bench_dir, "predictions.jsonl")) == lines
    assert listing(bench_dir) == ["metrics.json", "predictions.jsonl", "run.json"]



def test_rank_files_are_found_by_name_not_by_a_stale_listing(tmp_path, monkeypatch):
    """Rank 0 found the ranks' files by os.listdir, which a network file system may serve from a
    stale cache: rank 1's lines were lost. It now waits for each expected name, with a timeout
    naming a file that never shows."""
    bench_dir = str(tmp_path)
    lines = [dict(id=str(i), answer=f"a{i}", error=None) for i in range(3)]
    with open(E.rank_file(bench_dir, 0), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines[:2])
    monkeypatch.setattr(os, "listdir", lambda *a: [])  # the stale listing: neither rank file in it

    def rank1_file_shows_late():
        time.sleep(0.5)
        with open(E.rank_file(bench_dir, 1), "w") as f:
            f.write(json.dumps(lines[2]) + "\n")
    late = threading.Thread(target=rank1_file_shows_late)
    late.start()
    known = E.Predictions(records={}, n_lines=0)
    E.gather_rank_files(bench_dir, known, {str(i): i for i in range(3)}, world=2, timeout_s=30)
    late.join()
    assert read_jsonl(os.path.join(bench_dir, "predictions.jsonl")) == lines and known.n_lines == 3
    assert not os.path.exists(E.rank_file(bench_dir, 0)) and not os.path.exists(E.rank_file(bench_dir, 1))
    open(E.rank_file(bench_dir, 0), "w").close()
    with pytest.raises(E.EvalError, match=r"predictions\.rank1\.jsonl is missing 0\.5 s after every rank finished"):
        E.gather_rank_files(bench_dir, known, {}, world=2, timeout_s=0.5)


def test_second_eval_on_the_same_benchmark_is_refused_naming_the_first(tiny_data, tmp_path):
    """Two eval.py processes on one --out and benchmark both generated every item (36 lines for 24
    ids). Now the second is refused at once, before its model loads, naming the pid that holds the
    benchmark's lock; the first finishes with one line per item. Two real processes; the first is
    held by SIGSTOP once it holds the lock, as a long benchmark would hold it."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--bench", "imagenet", "--limit", "4",
           *tiny_flags(tiny_data, out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, "imagenet", ".lock")
    try:
        deadline = time.monotonic() + 300
        while not (os.path.exists(lock) and open(lock).read().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first eval.py never took its lock"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # the first is mid-benchmark, holding the lock
        with open(lock) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert f"{out}/imagenet is being evaluated by another eval.py (pid {first.pid} holds" in second.stderr
    ids = [p["id"] for p in read_jsonl(os.path.join(out, "imagenet", "predictions.jsonl"))]
    assert sorted(ids) == sorted(it.id for it in B.BENCHMARKS["imagenet"].read(tiny_data)[:4]) and len(set(ids)) == 4


# -----------------------------------------------------------------------------
# faults: each costs what it should, and the message names the cause

@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory):
    """Two imagenet-ft style run dirs around one tiny base, with different projector weights."""
    root = tmp_path_factory.mktemp("runs")
    base = str(root / "base")
    tiny.save_tiny_base(*tiny.tiny_llava(seed=0), base)
    dirs = []
    for seed in (1, 2):
        llava, _ = carpe.load_base(base)
        model = baselines.build_model("imagenet-ft", llava)
        g = torch.Generator().manual_seed(seed)
        state = {k: (v + 0.5 * torch.randn(v.shape, generator=g)).contiguous() for k, v in model.trainable_state_dict().items()}
        d = str(root / f"ft{seed}")
        os.makedirs(d)
        save_file(state, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, common.RUN_CONFIG), "w") as f:
            json.dump(dict(method="imagenet-ft", base=base, carpe=None, moe=None, train={}), f)
        dirs.append(d)
    return base, dirs


def test_rerun_with_other_weights_or_dtype_is_refused(run_dirs, tiny_data, tmp_path):
    _, (a, b) = run_dirs
    run = str(tmp_path / "run")
    shutil.copytree(a, run)
    args = ["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data, "--ckpt", run]
    E.main(args)
    first = common.run_digest(run)
    with pytest.raises(E.EvalError, match="dtype=float32.*dtype=bfloat16"):
        E.main(args + ["--dtype", "bfloat16"])
    shutil.copy(os.path.join(b, "model.safetensors"), os.path.join(run, "model.safetensors"))  # retrained in place
    with pytest.raises(E.EvalError, match=f"weights={first}.*weights={common.run_digest(run)}"):
        E.main(args)
    preds = read_jsonl(os.path.join(run, "eval", "mmvp", "predictions.jsonl"))
    assert len(preds) == 4  # nothing was mixed in


def corrupt_copy(tiny_data, dest):
    """A copy of the MMVP and MMBench folders with one truncated JPEG and one broken base64 image."""
    for name in ("MMVP", "mmbench"):
        shutil.copytree(os.path.join(tiny_data, name), os.path.join(dest, name))
    image = os.path.join(dest, "MMVP", "MMVP Images", "2.jpg")
    with open(image, "rb") as f:
        raw = f.read()
    with open(image, "wb") as f:
        f.write(raw[:len(raw) // 3])
    tsv = os.path.join(dest, "mmbench", "mmbench_dev_20230712.tsv")
    with open(tsv) as f:
        rows = f.read().split("\n")
    cells = rows[1].split("\t")
    cells[9] = "!!" + cells[9][2:len(cells[9]) // 2]  # the first row's image: not base64, and cut
    rows[1] = "\t".join(cells)
    with open(tsv, "w") as f:
        f.write("\n".join(rows))
    return image


def test_corrupt_image_costs_one_item(tiny_data, tmp_path, monkeypatch):
    data_root = str(tmp_path / "data")
    image = corrupt_copy(tiny_data, data_root)
    out = str(tmp_path / "out")
    args = ["--bench", "mmvp,mmbench", *tiny_flags(data_root, out)]
    E.main(args)
    preds = {p["id"]: p for p in read_jsonl(os.path.join(out, "mmvp", "predictions.jsonl"))}
    assert len(preds) == 4 and preds["2"]["answer"] == "" and preds["2"]["path"] == image
    assert image in preds["2"]["error"] and all(preds[i]["error"] is None for i in ("1", "3", "4"))
    with open(os.path.join(out, "mmvp", "metrics.json")) as f:
        m = json.load(f)
    assert m["n"] == 4 and m["n_failed"] == 1 and m["failed_ids"] == ["2"]
    mmbench = read_jsonl(os.path.join(out, "mmbench", "predictions.jsonl"))
    failed = [p for p in mmbench if p["error"]]  # row 0 and its two circular copies share the broken image
    assert sorted(p["id"] for p in failed) == ["0", "1000000", "2000000"] and len(mmbench) == 6
    assert all("base64" in p["error"] for p in failed)
    # a rerun neither dies on the item nor retries it ...
    generated = []
    real = E.generate_records
    monkeypatch.setattr(E, "generate_records", lambda loaded, batches, *a: generated.extend(
        it.id for b in batches for it in b) or real(loaded, batches, *a))
    E.main(args)
    assert generated == []
    # ... unless asked to, once the image is repaired: then exactly that item, one line per id
    shutil.copy(os.path.join(tiny_data, "MMVP", "MMVP Images", "2.jpg"), image)
    E.main(["--bench", "mmvp", "--retry-failed", *tiny_flags(data_root, out)])
    assert generated == ["2"]
    preds = read_jsonl(os.path.join(out, "mmvp", "predictions.jsonl"))
    assert [p["id"] for p in preds] == ["1", "2", "3", "4"] and not any(p["error"] for p in preds)
    with open(os.path.join(out, "mmvp", "metrics.json")) as f:
        assert json.load(f)["n_failed"] == 0


def test_empty_benchmark_is_an_error_not_a_zero(tmp_path):
    for shape in ("circle", "square"):  # class folders, but not one image in them
        os.makedirs(tmp_path / "data" / "caltech101" / "test" / shape)
    out = str(tmp_path / "out")
    with pytest.raises(E.EvalError, match=r"caltech101: no items .*" + str(tmp_path / "data")):
        E.main(["--bench", "caltech101", *tiny_flags(str(tmp_path / "data"), out)])
    assert not os.path.exists(os.path.join(out, "caltech101", "metrics.json"))


def test_non_finite_weights_are_refused(run_dirs, tiny_data, tmp_path):
    base, (a, _) = run_dirs
    run = str(tmp_path / "nan-run")
    shutil.copytree(a, run)
    state = load_file(os.path.join(run, "model.safetensors"))
    key = sorted(state)[0]
    state[key][0] = float("nan")
    save_file(state, os.path.join(run, "model.safetensors"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        E.main(["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data, "--ckpt", run])
    assert not os.path.exists(os.path.join(run, "eval", "mmvp", "predictions.jsonl"))
    nan_base = str(tmp_path / "nan-base")  # a bare base with an inf
    llava, processor = carpe.load_base(base)
    with torch.no_grad():
        llava.model.language_model.norm.weight[3] = float("inf")
    tiny.save_tiny_base(llava, processor, nan_base)
    with pytest.raises(E.EvalError, match=r"language_model\.norm\.weight holds non-finite"):
        E.main(["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data, "--base", nan_base,
                "--out", str(tmp_path / "o")])


def test_out_that_is_a_file_is_named(tiny_data, tmp_path):
    """--out naming a file raised a FileExistsError traceback from os.makedirs."""
    (tmp_path / "results.txt").write_text("notes")
    for out in (tmp_path / "results.txt", tmp_path / "results.txt" / "sub"):
        with pytest.raises(E.EvalError, match=f"--out {out} is a file, not a folder"):
            E.main(["--bench", "mmvp", *tiny_flags(tiny_data, str(out))])


def test_ckpt_of_a_run_still_training_names_its_newest_checkpoint_which_evaluates(run_dirs, tiny_data, tmp_path):
    """eval.py --ckpt on a run still training said it was "not a train.py run directory"; now it
    says it has no final weights yet and names its newest checkpoint, which --ckpt takes: the
    predictions go to <run>/eval-step_N, never into ckpt/ (whose retention deletes folders)."""
    _, (a, _) = run_dirs
    run = str(tmp_path / "run")
    weights = load_file(os.path.join(a, "model.safetensors"))
    config = common.read_run_config(a)
    for step in (2, 4):  # the checkpoints a run writes as it trains, before its final weights
        common.save_checkpoint(common.checkpoint_path(run, step), weights, dict(optimizer={}), dict(step=step),
                               config, 0, torch.device("cpu"))
    newest = common.checkpoint_path(run, 4)
    with pytest.raises(E.EvalError, match=f"--ckpt {run} has no final weights yet .*its newest checkpoint is "
                                          f"{newest}: evaluate that with --ckpt {newest}"):
        E.main(["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data, "--ckpt", run])
    assert not os.path.exists(os.path.join(run, "eval"))  # refused before anything was written
    with pytest.raises(E.EvalError, match=f"--ckpt {tmp_path} is not a train.py run folder"):
        E.main(["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data, "--ckpt", str(tmp_path)])
    before = sorted(os.listdir(newest))
    E.main(["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data, "--ckpt", newest])
    with open(os.path.join(run, "eval-step_0000004", "mmvp", "metrics.json")) as f:
        assert json.load(f)["n"] == 4
    with open(os.path.join(run, "eval-step_0000004", "summary.md")) as f:
        assert "| run@step_0000004 |" in f.read()
    assert sorted(os.listdir(newest)) == before and common.verify_manifest(newest, required=True)


def test_tiny_benchmarks_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """eval.py --preset tiny started elsewhere drew the tiny benchmarks again into that directory
    (runs/tiny-eval-data); they now live in --cache-dir, the repository's .cache by default."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = E.parse_args(["--bench", "mmvp", "--preset", "tiny", "--base", "tiny"])
    assert args.data_root == os.path.join(ROOT, ".cache", "tiny-eval-data")
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    E.main(["--bench", "mmvp", "--preset", "tiny", "--base", "tiny", "--cache-dir", cache, "--out", out])
    assert os.path.isdir(os.path.join(cache, "tiny-eval-data", "MMVP")) and os.listdir(elsewhere) == []
    assert os.path.isfile(os.path.join(out, "mmvp", "metrics.json"))


def test_kill_while_drawing_tiny_benchmarks_leaves_no_half_folder(tmp_path, monkeypatch):
    root = str(tmp_path / "tiny-eval-data")

    def killed(*a):
        raise KeyboardInterrupt  # like a kill: nothing after this point runs

    monkeypatch.setattr(tiny, "draw_tiny_mmbench", killed)
    with pytest.raises(KeyboardInterrupt):
        E.main(["--bench", "mmvp", *tiny_flags(root, str(tmp_path / "out"))])
    assert not os.path.exists(root)  # only a temporary sibling was written
    monkeypatch.undo()
    E.main(["--bench", "mmvp", *tiny_flags(root, str(tmp_path / "out"))])  # the next run draws it whole
    fresh = tiny.build_tiny_benchmarks(str(tmp_path / "fresh"))
    files = lambda r: sorted(os.path.relpath(os.path.join(d, f), r) for d, _, fs in os.walk(r) for f in fs)
    assert files(root) == files(fresh)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # the killed draw's temporary folder is gone too


def test_closed_world_prompt_too_long_names_both_lengths_and_closed_k(tiny_data, tmp_path):
    """A base with fewer positions than the full closed-world prompt needs: refused with both
    numbers and --closed-k; --closed-k 2 fits."""
    base = str(tmp_path / "short-base")
    shutil.copytree(tiny.ensure_random_base(os.path.join(ROOT, ".cache")), base)
    llava, processor = carpe.load_base(base)
    conversation = data.ConversationTokenizer(processor.tokenizer, data.n_image_tokens(processor),
                                              llava.config.image_token_id)
    length = lambda k: max(len(conversation.encode_prompt(it.question))
                           for it in B.BENCHMARKS["imagenet"].read(tiny_data, world="closed", closed_k=k))
    positions = length(2) + 8  # room for the 2-candidate prompts and 8 new tokens, not for all 6 names
    assert length(None) + 8 > positions
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["max_position_embeddings"] = positions
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(config, f)
    flags = ["--bench", "imagenet", "--world", "closed", "--preset", "tiny", "--base", base, "--data-root", tiny_data]
    with pytest.raises(E.EvalError, match=rf"prompt is \d+ tokens, \+ 8 new tokens > the model's {positions} positions.*--closed-k K") as e:
        E.main(flags + ["--out", str(tmp_path / "all")])
    assert positions - 8 < int(str(e.value).split("prompt is ")[1].split()[0]) <= length(None)
    E.main(flags + ["--closed-k", "2", "--out", str(tmp_path / "k2")])
    with open(tmp_path / "k2" / "imagenet" / "run.json") as f:
        assert json.load(f)["closed_k"] == 2


# -----------------------------------------------------------------------------
# WiSE-FT

def test_wise_ft_endpoints_exact_and_midpoint(run_dirs, tmp_path):
    _, (a, b) = run_dirs
    A, B_ = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    for alpha, expect in ((0.0, A), (1.0, B_)):
        out = common.interpolate_weights(a, b, alpha, str(tmp_path / f"w{alpha}"))
        merged = load_file(os.path.join(out, "model.safetensors"))
        assert merged.keys() == expect.keys()
        assert all(torch.equal(merged[k], expect[k]) for k in expect), alpha
        assert common.is_run_dir(out)  # a loadable run dir
    mid = load_file(os.path.join(common.interpolate_weights(a, b, 0.5, str(tmp_path / "mid")), "model.safetensors"))
    assert all(torch.allclose(mid[k], (A[k] + B_[k]) / 2) for k in A)


def test_wise_ft_eval_at_alpha0_is_endpoint_a(run_dirs, tiny_data, tmp_path):
    _, (a, b) = run_dirs
    flags = ["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data]
    E.main(flags + ["--ckpt", a, "--out", str(tmp_path / "a")])
    E.main(flags + ["--wise-ft", a, b, "--alpha", "0", "--out", str(tmp_path / "w")])
    pa = read_jsonl(str(tmp_path / "a" / "mmvp" / "predictions.jsonl"))
    pw = read_jsonl(str(tmp_path / "w" / "mmvp" / "predictions.jsonl"))
    E.main(flags + ["--ckpt", b, "--out", str(tmp_path / "b")])
    pb = read_jsonl(str(tmp_path / "b" / "mmvp" / "predictions.jsonl"))
    assert [p["answer"] for p in pa] != [p["answer"] for p in pb]  # A and B differ, so the check can fail
    assert [p["answer"] for p in pa] == [p["answer"] for p in pw]
    E.main(flags + ["--wise-ft", a, b, "--alpha", "0", "--out", str(tmp_path / "w")])  # a rerun: same digest, accepted
    with pytest.raises(E.EvalError, match="alpha=0.0.*alpha=0.5"):
        E.main(flags + ["--wise-ft", a, b, "--alpha", "0.5", "--out", str(tmp_path / "w")])


def test_wise_ft_base_dirs_and_refusals(run_dirs, tmp_path):
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


def test_wise_ft_base_against_its_imagenet_ft_run(run_dirs, tiny_data, tmp_path):
    """The paper's WiSE-FT in our harness: --wise-ft BASE RUN interpolates the run's projector
    with the base's own projector; alpha 0 is vanilla LLaVA, alpha 1 the fine-tuned run."""
    base, (run, _) = run_dirs
    flags = ["--bench", "mmvp", "--preset", "tiny", "--data-root", tiny_data]
    E.main(flags + ["--base", base, "--method", "llava", "--out", str(tmp_path / "vanilla")])
    E.main(flags + ["--ckpt", run, "--out", str(tmp_path / "ft")])
    E.main(flags + ["--wise-ft", base, run, "--alpha", "0", "--out", str(tmp_path / "w0")])
    E.main(flags + ["--wise-ft", base, run, "--alpha", "1", "--out", str(tmp_path / "w1")])
    answers = lambda d: [p["answer"] for p in read_jsonl(str(tmp_path / d / "mmvp" / "predictions.jsonl"))]
    assert answers("vanilla") != answers("ft")  # the endpoints differ, so the checks below can fail
    assert answers("w0") == answers("vanilla") and answers("w1") == answers("ft")
    side = load_file(str(tmp_path / "w0" / "wise_ft_base_side" / "model.safetensors"))
    llava, _ = carpe.load_base(base)
    proj = {f"llava.model.{k}": v for k, v in llava.model.named_parameters() if k.startswith("multi_modal_projector.")}
    assert side.keys() == proj.keys() and all(torch.equal(side[k], proj[k]) for k in proj)


# -----------------------------------------------------------------------------
# the comparison table from real eval dirs

def test_comparison_table_from_eval_dirs(full_eval, tiny_data, tmp_path, capsys):
    other = str(tmp_path / "carpe-untrained")
    E.main(["--bench", "imagenet,mme", "--method", "carpe", "--integrator-heads", "4", *tiny_flags(tiny_data, other)])
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
# CARPE-MoE run dir: dict pixel_values from vision_moe.preprocess, routing keyed by expert name

def test_moe_run_dir_records_routes_by_name(run_dirs, tiny_data, tmp_path):
    base, _ = run_dirs
    llava, _ = carpe.load_base(base)
    moe_config = tiny.tiny_moe_config()
    cfg = carpe.CarpeConfig(integrator_heads=4)
    model = baselines.build_model("carpe", llava, cfg, vision_moe=moe.build_vision_moe(llava, moe_config))
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    for k in state:  # a router and context encoder that say something
        if "router" in k or "context_encoder" in k:
            state[k] = torch.randn(state[k].shape, generator=g)
    run = str(tmp_path / "moe-run")
    os.makedirs(run)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(run, "model.safetensors"))
    with open(os.path.join(run, common.RUN_CONFIG), "w") as f:
        json.dump(dict(method="carpe", base=base, carpe=cfg.to_dict(), moe=moe_config.to_dict(), train={}), f)
    E.main(["--bench", "mme", "--preset", "tiny", "--ckpt", run, "--data-root", tiny_data])
    preds = read_jsonl(os.path.join(run, "eval", "mme", "predictions.jsonl"))
    with open(os.path.join(run, "eval", "mme", "metrics.json")) as f:
        m = json.load(f)
    names = [e.name for e in moe_config.experts]
    routes = collections.Counter(p["route"] for p in preds)
    assert list(m["routing"]) == names and set(routes) <= set(names)
    assert m["routing"] == {n: routes.get(n, 0) for n in names} and sum(routes.values()) == len(preds)
    w = m["context_weights"]
    assert math.isclose(w["vision"] + w["language"], 1.0, rel_tol=1e-5) and w["vision"] != 0.5


# -----------------------------------------------------------------------------
# --compile: the repeated blocks compiled, the answers those of eager

def test_compile_flag_compiles_the_repeated_blocks_and_answers_alike(full_eval, tiny_data, tmp_path, monkeypatch):
    compiled = []
    real = kernels.compile_blocks

    def aot_eager(blocks, backend="inductor", **kw):  # the fast backend: same graphs, no code generation
        compiled.extend(blocks)
        return real(blocks, backend="aot_eager", **kw)
    monkeypatch.setattr(kernels, "compile_blocks", aot_eager)
    out = str(tmp_path / "compiled")
    E.main(["--bench", "mmvp", "--compile", *tiny_flags(tiny_data, out)])
    torch._dynamo.reset()
    assert len(compiled) >= 6 + 3  # at least the tiny LLaVA's 6 decoder layers and 3 vision layers
    answers = lambda d: [p["answer"] for p in read_jsonl(os.path.join(d, "mmvp", "predictions.jsonl"))]
    assert answers(out) == answers(full_eval)


# -----------------------------------------------------------------------------
# prompts: the ids training gives that user turn, left-padded

def test_eval_prompt_ids_match_training_tokenisation(tmp_path):
    llava, processor = tiny.tiny_llava()
    P = data.n_image_tokens(processor)
    collate = E.BatchCollator(processor.tokenizer, carpe.make_image_transform(processor), P, "vicuna_v1")
    conversation = data.ConversationTokenizer(processor.tokenizer, P, processor.tokenizer.convert_tokens_to_ids("<image>"))
    image_path = str(tmp_path / "x.png")
    from PIL import Image
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image_path)
    questions = ["What shape is it?", "Is there a red star in the picture? Answer yes or no."]
    batch = collate([[B.Item(str(i), q, image_path) for i, q in enumerate(questions)]])
    assert batch.pixel_values.shape[0] == 2 and (batch.attention_mask[:, -1] == 1).all()
    assert (batch.attention_mask[:, 0] == 0).any() and batch.failed == []
    for row, mask, q in zip(batch.input_ids, batch.attention_mask, questions):
        ids, labels, _ = conversation(["<image>\n" + q, "circle"])
        first_answer = next(i for i, l in enumerate(labels) if l != data.IGNORE_INDEX)
        assert row[mask.bool()].tolist() == ids[:first_answer]



def test_eval_decodes_a_16_bit_image_as_training_does(tmp_path):
    """A 16-bit PNG (mode I;16) went through convert("RGB") to an all-white picture in eval; eval now
    decodes through data.load_image, training's decoder: the pixels are those of its 8-bit twin."""
    import numpy as np
    from PIL import Image
    _, processor = tiny.tiny_llava()
    transform = carpe.make_image_transform(processor)
    collate = E.BatchCollator(processor.tokenizer, transform, data.n_image_tokens(processor), "vicuna_v1")
    ramp = np.tile(np.linspace(0, 1, 48), (32, 1))
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(tmp_path / "wide.png")
    Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "twin.png")
    batch = collate([[B.Item("0", "What shape is it?", str(tmp_path / "wide.png"))]])
    assert batch.failed == []
    assert torch.allclose(batch.pixel_values, transform([Image.open(tmp_path / "twin.png").convert("RGB")]))
    assert batch.pixel_values.std() > 0.3  # a ramp, not one white picture

# -----------------------------------------------------------------------------
# the tiny world's check: after the tiny training run, CARPE classifies the synthetic shapes far
# above chance, and far better than the base, which never saw a classification prompt. It runs
# the README's commands (train.py --preset tiny, then eval.py); about 80 s once the tiny base
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
