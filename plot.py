"""
plot.py: the pictures of a run. PNG figures from a train.py run folder's log.jsonl and, given
them, from eval.py folders (several runs side by side).

    python plot.py runs/tiny --out figures                      # the run's curves (+ runs/tiny/eval if there)
    python plot.py runs/carpe runs/llava/eval runs/carpe runs/carpe-moe --out figures   # + benchmarks across runs

Figures written to --out:
  training.png   loss, learning rates, mean vision weight (alpha) and skipped steps over the steps,
                 each panel with the epoch boundaries marked and the epoch-1 context freeze shaded
  routing.png    CARPE-MoE: the share of samples routed to each expert per step (only when the log
                 has routes)
  accuracy.png   the headline score of each benchmark, one bar per eval folder (given eval folders)
  weights.png    Table 4: mean (vision, language) context weights over the classification and the
                 vision-language benchmarks, per eval folder (given eval folders with weights)

log.jsonl is train.py's (log_step): one line per step with step, epoch, loss, lr_<group>,
vision_weight, skipped_step (the reason, or null), skipped_steps (so far), context_trainable and,
under --moe, route ({expert: samples}). Eval folders are read by benchmarks.read_eval_dir, the
reader of eval.py --table, so the bars are the numbers of the paper's tables.

matplotlib is an optional extra (requirements-plot.txt); the core install does not need it.
Figures have a fixed size (--width x --height inches at --dpi), never cropped to their content.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

try:  # optional: the training and eval code never need it
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
except ImportError:
    matplotlib = plt = None

from benchmarks import BENCHMARKS, CLS_BENCHES, VL_BENCHES, read_eval_dir, read_eval_dirs

INSTALL = "pip install -r requirements-plot.txt"
SKIP_COLOR = "tab:red"
FROZEN_COLOR = "0.92"  # light grey: steps with the context prompt and encoder frozen


@dataclass
class Log:
    """log.jsonl as columns, one entry per step (in step order)."""
    path: str
    steps: list
    epochs: list
    loss: list  # non-finite values (a skipped step's) as NaN
    lrs: dict  # {"lr_<group>": [...]}
    vision_weight: list
    skipped: list  # the skip reason of each step, or None
    skipped_total: list  # skipped steps so far
    context_trainable: list
    routes: dict | None  # {expert: [samples routed per step]} or None without MoE


@dataclass
class EvalRun:
    name: str  # the eval folder's run name (as eval.py --table names it)
    scores: dict  # {bench: headline}
    weights: dict  # {bench: (vision, language) or None}


# -----------------------------------------------------------------------------
# reading

def finite(x):
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


def read_log(run_dir):
    """-> Log. A torn last line (a run still writing) is left out, saying so; any other bad line is
    an error naming the file and the line."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"plot.py: {path} not found (RUN must be a train.py --out folder)")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    by_step = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines):  # the last line without its newline: a write in progress
                print(f"plot.py: {path} line {n} is incomplete (a run still writing?); plotted without it")
                continue
            raise SystemExit(f"plot.py: {path} line {n} is not JSON: {line[:80]!r}")
        if "step" not in record or "loss" not in record:
            raise SystemExit(f"plot.py: {path} line {n} has no step or loss: not a train.py log")
        by_step[record["step"]] = record  # a repeated step: the later line is the one training kept
    if not by_step:
        raise SystemExit(f"plot.py: {path} holds no steps yet")
    records = [by_step[s] for s in sorted(by_step)]
    lr_keys = sorted({k for r in records for k in r if k.startswith("lr_")})
    experts = list(dict.fromkeys(name for r in records for name in (r.get("route") or {})))
    return Log(path=path, steps=[r["step"] for r in records], epochs=[r.get("epoch", 1) for r in records],
               loss=[finite(r["loss"]) for r in records],
               lrs={k: [finite(r.get(k)) for r in records] for k in lr_keys},
               vision_weight=[finite(r.get("vision_weight")) for r in records],
               skipped=[r.get("skipped_step") for r in records],
               skipped_total=[r.get("skipped_steps", 0) for r in records],
               context_trainable=[bool(r.get("context_trainable", True)) for r in records],
               routes={e: [(r.get("route") or {}).get(e, 0) for r in records] for e in experts} if experts else None)


def read_eval_runs(dirs):
    """-> [EvalRun], one per folder (an eval folder or a run folder holding eval/)."""
    try:
        return [EvalRun(*row) for row in read_eval_dirs(dirs, where="plot.py")]
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


# -----------------------------------------------------------------------------
# figures

def epoch_boundaries(log):
    """Steps after which a new epoch starts (x positions between two steps)."""
    return [s + 0.5 for s, e, e_next in zip(log.steps, log.epochs, log.epochs[1:]) if e_next != e]


def frozen_spans(log):
    """(first, last) step ranges with the context prompt and encoder frozen."""
    spans, start = [], None
    for s, trainable in zip(log.steps, log.context_trainable):
        if not trainable and start is None:
            start = s
        if trainable and start is not None:
            spans.append((start, s - 1))
            start = None
    if start is not None:
        spans.append((start, log.steps[-1]))
    return spans


def mark_epochs(ax, log):
    """Epoch boundaries as dashed lines, the context freeze shaded, skipped steps as red ticks."""
    for lo, hi in frozen_spans(log):
        ax.axvspan(lo - 0.5, hi + 0.5, color=FROZEN_COLOR, zorder=0)
    for x in epoch_boundaries(log):
        ax.axvline(x, color="0.4", linestyle="--", linewidth=0.8)
    for s, reason in zip(log.steps, log.skipped):
        if reason:
            ax.axvline(s, color=SKIP_COLOR, linewidth=0.8, alpha=0.6)


def new_figure(args, rows, cols):
    return plt.subplots(rows, cols, figsize=(args.width, args.height), dpi=args.dpi, layout="constrained",
                        squeeze=False)


def save(fig, args, name):
    path = os.path.join(args.out, name)
    fig.savefig(path, dpi=args.dpi)  # fixed size: never cropped to the content
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot_training(log, args, title):
    """training.png: loss, learning rates, vision weight, skipped steps (2 x 2, one step axis)."""
    fig, axes = new_figure(args, 2, 2)
    (ax_loss, ax_lr), (ax_w, ax_skip) = axes
    ax_loss.plot(log.steps, log.loss, color="tab:blue", linewidth=1.5)
    ax_loss.set(title="training loss", ylabel="loss")
    for key, values in log.lrs.items():
        ax_lr.plot(log.steps, values, linewidth=1.5, label=key.removeprefix("lr_"))
    if any(v > 0 for values in log.lrs.values() for v in values):
        ax_lr.set_yscale("log")  # the adapter's and the rest's rates differ tenfold
    ax_lr.set(title="learning rates", ylabel="lr")
    if log.lrs:
        ax_lr.legend(fontsize="small")
    ax_w.plot(log.steps, log.vision_weight, color="tab:green", linewidth=1.5)
    ax_w.set(title="mean vision weight (alpha)", ylabel="alpha", ylim=(-0.02, 1.02))
    ax_skip.step(log.steps, log.skipped_total, where="post", color=SKIP_COLOR, linewidth=1.5)
    ax_skip.set(title=f"skipped steps (total {log.skipped_total[-1]})", ylabel="skipped so far",
                ylim=(-0.05, max(1, log.skipped_total[-1]) * 1.1))
    for ax in axes.flat:
        mark_epochs(ax, log)
        ax.set_xlabel("step")
        ax.set_xlim(log.steps[0] - 0.5, log.steps[-1] + 0.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: dashed = epoch boundary, grey = context frozen, red = skipped step", fontsize="medium")
    return save(fig, args, "training.png")


def plot_routing(log, args, title):
    """routing.png: the share of each expert among the step's routed samples (stacked)."""
    fig, axes = new_figure(args, 1, 1)
    ax = axes[0, 0]
    totals = [sum(counts) for counts in zip(*log.routes.values())]
    shares = {e: [c / t if t else float("nan") for c, t in zip(counts, totals)] for e, counts in log.routes.items()}
    ax.stackplot(log.steps, *shares.values(), labels=list(shares), alpha=0.85)
    ax.axhline(1 / len(shares), color="0.2", linestyle=":", linewidth=0.8, label="uniform")
    mark_epochs(ax, log)
    ax.set(title=f"{title}: MoE routing share per step", xlabel="step", ylabel="share of routed samples",
           ylim=(0, 1), xlim=(log.steps[0] - 0.5, log.steps[-1] + 0.5))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return save(fig, args, "routing.png")


def grouped_bars(ax, labels, series, ylabel):
    """series: {run name: [value or None per label]}; missing values leave a gap."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=name)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in values], fontsize="small")
    crowded = len(labels) > 6  # the 11 paper benchmarks: slanted names
    ax.set_xticks(range(len(labels)), labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def plot_accuracy(runs, args):
    """accuracy.png: each benchmark's headline score (the paper's table cell), one bar per run."""
    benches = [b for b in BENCHMARKS if any(b in r.scores for r in runs)]
    fig, axes = new_figure(args, 1, 1)
    grouped_bars(axes[0, 0], [BENCHMARKS[b].display for b in benches],
                 {r.name: [r.scores.get(b) for b in benches] for r in runs},
                 "headline score (accuracy %, POPE F1, MME P+C)")
    axes[0, 0].set_title("benchmarks (eval.py headline scores)")
    return save(fig, args, "accuracy.png")


def group_mean(weights, group):
    ws = [weights[b] for b in group if weights.get(b) is not None]
    return (sum(w[0] for w in ws) / len(ws), sum(w[1] for w in ws) / len(ws)) if ws else None


def plot_weights(runs, args):
    """weights.png: Table 4, the mean (vision, language) weights over the classification and the
    vision-language benchmarks, then each benchmark outside the paper's tables on its own (e.g.
    fashion-mnist), stacked to 1 per run; None when no run has weights (e.g. only bare bases)."""
    extra = [b for b in BENCHMARKS if b not in CLS_BENCHES + VL_BENCHES and any(r.weights.get(b) for r in runs)]
    groups = [("classification", CLS_BENCHES), ("vision-language", VL_BENCHES)] + [(BENCHMARKS[b].display, (b,))
                                                                                for b in extra]
    groups = [(label, g) for label, g in groups if any(group_mean(r.weights, g) for r in runs)]
    if not groups:
        return None
    cells = {r.name: [group_mean(r.weights, g) for _, g in groups] for r in runs}
    fig, axes = new_figure(args, 1, 1)
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    for i, (name, row) in enumerate(cells.items()):
        xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(groups))]
        vision = [float("nan") if c is None else c[0] for c in row]
        language = [float("nan") if c is None else c[1] for c in row]
        bars = ax.bar(xs, vision, width, label=f"{name}: vision", color=f"C{i}")
        ax.bar(xs, language, width, bottom=vision, color=f"C{i}", alpha=0.3, hatch="//", label=f"{name}: language")
        ax.bar_label(bars, labels=["-" if c is None else f"{c[0]:.2f} / {c[1]:.2f}" for c in row],
                     label_type="center", fontsize="small")
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set(title="Table 4: mean context weights (vision / language)", ylabel="weight", ylim=(0, 1.05))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return save(fig, args, "weights.png")


# -----------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(description="PNG figures of a CARPE run: training curves from RUN/log.jsonl and, "
                                "given eval folders, benchmark scores and Table 4's weights across runs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a train.py --out folder (its log.jsonl gives training.png and, "
                   "under --moe, routing.png)")
    p.add_argument("eval_dirs", metavar="EVAL_DIR", nargs="*",
                   help="eval.py output folders (<dir>/<bench>/metrics.json) or run folders holding eval/, one "
                   "bar per folder in accuracy.png and weights.png; none given: RUN/eval when it exists")
    p.add_argument("--out", required=True, help="folder for the PNG files (created)")
    p.add_argument("--title", default=None, help="title of the training figures (default: RUN's folder name)")
    p.add_argument("--width", type=float, default=10.0, help="figure width in inches")
    p.add_argument("--height", type=float, default=6.0, help="figure height in inches")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch: a PNG is width*dpi x height*dpi pixels")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.width <= 0 or args.height <= 0 or args.dpi <= 0:
        p.error("--width, --height and --dpi must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if plt is None:
        raise SystemExit(f"plot.py needs matplotlib, an optional extra: {INSTALL}")
    log = read_log(args.run)  # before creating --out: a wrong RUN writes nothing
    os.makedirs(args.out, exist_ok=True)
    title = args.title or os.path.basename(os.path.normpath(args.run))
    written = [plot_training(log, args, title)]
    if log.routes:
        written.append(plot_routing(log, args, title))
    eval_dirs = args.eval_dirs
    if not eval_dirs and read_eval_dir(os.path.join(args.run, "eval"))[0]:  # the run's own eval folder, if scored
        eval_dirs = [os.path.join(args.run, "eval")]
    if eval_dirs:
        runs = read_eval_runs(eval_dirs)
        written.append(plot_accuracy(runs, args))
        weights = plot_weights(runs, args)
        if weights:
            written.append(weights)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
