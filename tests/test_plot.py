"""plot.py on real runs: a short CARPE-MoE train.py run crossing an epoch boundary (its log has
routes), a plain CARPE run, and eval.py folders of both; the PNGs are decoded and looked at."""
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plot.py's extra: pip install -r requirements-plot.txt")
from PIL import Image  # noqa: E402

import eval as E  # noqa: E402
import plot  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPI, WIDTH, HEIGHT = 50, 10, 6  # -> 500 x 300 pixels
SIZE = ["--dpi", str(DPI), "--width", str(WIDTH), "--height", str(HEIGHT)]
WHITE = (255, 255, 255)
TAB = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44), "red": (214, 39, 40)}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """28 entries of the tiny preset's conversations: with --batch-size 8 at --mix 1:7, 4 steps an epoch."""
    args = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused"]))
    tiny.ensure_tiny_world(args.cache_dir)
    train.use_tiny_world(args)
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(json.load(open(args.data))[:28]))
    return str(path)


def train_run(small_data, out, *extra):
    train.main(["--preset", "tiny", "--data", small_data, "--mix", "1:7", "--batch-size", "8",
                "--micro-batch-size", "4", "--num-workers", "0", "--out", str(out), *extra])
    return str(out)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return tiny.build_tiny_benchmarks(str(tmp_path_factory.mktemp("bench")), per_class=1, n_vl=2)


@pytest.fixture(scope="module")
def moe_run(small_data, bench_root, tmp_path_factory):
    """6 steps of CARPE-MoE (epoch 2 from step 5), then eval.py on tiny ImageNet and POPE."""
    run = train_run(small_data, tmp_path_factory.mktemp("runs") / "moe", "--moe", "--max-steps", "6")
    E.main(["--bench", "imagenet,pope", "--preset", "tiny", "--ckpt", run, "--data-root", bench_root])
    return run


@pytest.fixture(scope="module")
def carpe_run(small_data, tmp_path_factory):
    return train_run(small_data, tmp_path_factory.mktemp("runs") / "carpe", "--max-steps", "3")


def read_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.convert("RGB")


def share_near(im, color, tol=40):
    """Share of pixels within tol (per channel) of color."""
    pixels = np.asarray(im, dtype=np.int16)  # (H, W, 3)
    return float((np.abs(pixels - np.array(color)) <= tol).all(-1).mean())


def check_figure(path, colors):
    """Decodes, has the asked size, is not blank, and shows each plotted colour."""
    assert os.path.exists(path), path
    im = read_png(path)
    assert im.size == (WIDTH * DPI, HEIGHT * DPI)
    non_white = 1 - share_near(im, WHITE, tol=8)
    assert non_white > 0.03, f"{path}: only {non_white:.1%} of the pixels are not white"
    for name, color in colors.items():
        assert share_near(im, color) * im.width * im.height >= 10, f"{path}: no {name} pixels {color}"
    return im


def test_moe_run_gives_training_routing_accuracy_and_weights(moe_run, tmp_path):
    out = str(tmp_path / "figs")
    written = plot.main([moe_run, "--out", out, *SIZE])  # no EVAL_DIR: the run's own eval/ is plotted
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["accuracy.png", "routing.png", "training.png", "weights.png"] == sorted(os.listdir(out))
    log = plot.read_log(moe_run)  # 4 steps an epoch, the context frozen in epoch 1
    assert plot.epoch_boundaries(log) == [4.5] and plot.frozen_spans(log) == [(1, 4)]
    # loss and rates (blue / orange), vision weight (green), skipped so far (red); grey: epoch-1 freeze
    check_figure(os.path.join(out, "training.png"), {**TAB, "context frozen": (235, 235, 235)})
    # the stacked shares: a colour for each expert that received samples in some step
    with open(os.path.join(moe_run, "log.jsonl")) as f:
        routes = [json.loads(line)["route"] for line in f]
    experts = list(routes[0])
    used = [i for i, e in enumerate(experts) if any(r[e] for r in routes)]
    assert used, "the router sent no sample anywhere"
    tab = list(TAB.values())
    blend = lambda c: tuple(round(0.85 * v + 0.15 * 255) for v in c)  # alpha 0.85 over white
    check_figure(os.path.join(out, "routing.png"), {experts[i]: blend(tab[i]) for i in used})
    check_figure(os.path.join(out, "accuracy.png"), {"run": TAB["blue"]})
    check_figure(os.path.join(out, "weights.png"), {"vision": TAB["blue"]})


def test_plain_carpe_run_has_no_routing_and_compares_eval_dirs(carpe_run, moe_run, tmp_path):
    out = str(tmp_path / "figs")
    written = plot.main([carpe_run, "--out", out, *SIZE])  # no routes in its log, no eval/ beside it
    assert [os.path.basename(p) for p in written] == ["training.png"] == os.listdir(out)
    # an EVAL_DIR without metrics is refused, naming it
    with pytest.raises(SystemExit, match=r"no <bench>/metrics.json under .*carpe"):
        plot.main([carpe_run, carpe_run, "--out", out, *SIZE])
    # two eval folders (an eval folder and a run folder holding eval/): two colours of bars
    shutil.copytree(os.path.join(moe_run, "eval"), tmp_path / "other" / "eval")
    written = plot.main([carpe_run, os.path.join(moe_run, "eval"), str(tmp_path / "other"), "--out", out, *SIZE])
    assert sorted(map(os.path.basename, written)) == ["accuracy.png", "training.png", "weights.png"]
    check_figure(os.path.join(out, "accuracy.png"), {"first": TAB["blue"], "second": TAB["orange"]})
    check_figure(os.path.join(out, "weights.png"), {"first": TAB["blue"], "second": TAB["orange"]})


def test_torn_and_bad_log_lines(carpe_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(carpe_run, run)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # a run killed mid-write
    plot.main([str(run), "--out", str(tmp_path / "a"), *SIZE])
    assert "line 4 is incomplete" in capsys.readouterr().out
    lines = (run / "log.jsonl").read_text().split("\n")
    # step 2 as train.py logs a step skipped for a NaN loss (json.dumps writes NaN / Infinity)
    records = [json.loads(line) for line in lines[:3]]
    records[1].update(loss=float("nan"), grad_norm=float("inf"), skipped_step="non-finite loss nan")
    for r in records[1:]:
        r["skipped_steps"] = 1
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "NaN" in (run / "log.jsonl").read_text()
    plot.main([str(run), "--out", str(tmp_path / "nan"), *SIZE])
    log = plot.read_log(str(run))
    assert log.skipped == [None, "non-finite loss nan", None] and log.skipped_total == [0, 1, 1]
    assert log.loss[1] != log.loss[1] and log.loss[0] == records[0]["loss"]  # NaN kept as a gap
    check_figure(str(tmp_path / "nan" / "training.png"), {"loss": TAB["blue"], "skipped so far": TAB["red"]})
    (run / "log.jsonl").write_text("\n".join(lines[:1] + ["not json"] + lines[1:3]) + "\n")
    with pytest.raises(SystemExit, match=r"log.jsonl line 2 is not JSON"):
        plot.main([str(run), "--out", str(tmp_path / "b"), *SIZE])
    with pytest.raises(SystemExit, match=r"log.jsonl not found"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "c")])
    assert not os.path.exists(tmp_path / "c")  # nothing written for a wrong RUN


def test_without_matplotlib_names_the_install_command(monkeypatch, carpe_run, tmp_path):
    """The core install has no matplotlib: importing plot.py works, running it says what to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location("plot_without_matplotlib", os.path.join(REPO, "plot.py"))
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    with pytest.raises(SystemExit, match=r"pip install -r requirements-plot.txt"):
        fresh.main([carpe_run, "--out", str(tmp_path / "figs")])


def test_help_explains_every_flag():
    for action in plot.build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings or action.dest
