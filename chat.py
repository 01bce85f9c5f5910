"""
chat.py: talk to a trained run about an image, in the run's own conversation template.

    python chat.py --ckpt runs/tiny --image shape.png                  # interactive, multi-turn
    python chat.py --ckpt runs/tiny --image shape.png --question "What is the colour of the shape?"
    python chat.py --ckpt user/carpe-7b --image cat.jpg --device cuda   # a Hub id

The image goes into the first turn and the conversation is kept, as LLaVA's llava.serve.cli does;
each answer is printed with the context weights that chose it ("vision 0.89" = the integrator's
share of the logits) and, for CARPE-MoE, the expert the router chose. In the chat: `clear` starts
the conversation over (same image), `exit`, `quit` or end of input (Ctrl-D) leave. Prompts and
pixels are exactly eval.py's (pretrained.ask); answers are greedy.
"""
import argparse
import json
import sys

import torch

import pretrained

QUIT = ("exit", "quit")


def describe(out):
    """' [vision 0.89 | language 0.11]' (+ the MoE route) beside an answer."""
    vision, language = out.context_weights
    route = f" | expert {out.route}" if out.route else ""
    return f"[vision {vision:.2f} | language {language:.2f}{route}]"


def read_turn(interactive):
    """The next user line, or None at end of input. Piped input is echoed so a transcript reads as one."""
    if interactive:
        try:
            return input("USER: ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    print(f"USER: {line.rstrip()}")
    return line


def chat(model, image, max_new_tokens, interactive):
    """The read-answer loop; history holds the (question, answer) turns so far."""
    history = []
    while True:
        line = read_turn(interactive)
        if line is None or line.strip().lower() in QUIT:
            return
        question = line.strip()
        if not question:
            continue
        if question.lower() == "clear":
            history = []
            print("(conversation cleared; same image)")
            continue
        out = pretrained.ask(model, image, question, max_new_tokens=max_new_tokens, return_dict=True, history=history)
        print(f"ASSISTANT: {out.answer}    {describe(out)}", flush=True)
        history.append((question, out.answer))


def build_parser():
    p = argparse.ArgumentParser(description="Chat with a trained CARPE / CARPE-MoE / baseline run about an image "
                                "(multi-turn, in the run's conversation template; `clear`, `exit` / `quit` or Ctrl-D).")
    p.add_argument("--ckpt", required=True, help="a train.py run folder, a saved (save_pretrained) folder, or a Hub id")
    p.add_argument("--image", default=None, help="the image (a file PIL reads) put in the first turn; without it "
                   "the chat is text only")
    p.add_argument("--question", default=None, help="answer this one question and exit (for scripts): the answer "
                   "alone on stdout")
    p.add_argument("--json", action="store_true", help="with --question: print one JSON line {answer, "
                   "context_weights, route} instead of the bare answer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model dtype (auto: float16 on GPU, float32 on CPU, as eval.py)")
    p.add_argument("--base", default=None, help="load the run on this base (Hub id, folder, or preset:tiny / "
                   "preset:small) instead of the one its config names")
    p.add_argument("--cache-dir", default=None, help="where the tiny / small preset worlds are cached (default: "
                   "the run's own, else the repo's .cache/)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.json and args.question is None:
        p.error("--json applies to --question only")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        image = pretrained.as_image(args.image, "--image")  # decoded once, before the model: a bad file fails at once
        print(f"loading {args.ckpt} ...", file=sys.stderr, flush=True)
        model = pretrained.load(args.ckpt, device=args.device, dtype=args.dtype, base=args.base, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError, TypeError) as e:
        sys.exit(f"chat.py: {e}")
    if args.question is not None:
        out = pretrained.ask(model, image, args.question, max_new_tokens=args.max_new_tokens, return_dict=True)
        print(json.dumps(dict(answer=out.answer, context_weights=list(out.context_weights), route=out.route))
              if args.json else out.answer)
        return
    interactive = sys.stdin.isatty()
    method = model.run_config.get("method", "carpe") + (" (MoE)" if model.run_config.get("moe") else "")
    print(f"{method} run {args.ckpt}, template {model.template}, image {args.image or '(none: text only)'}; "
          f"`clear` starts over, `exit` or Ctrl-D leaves", flush=True)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
        except ImportError:
            pass
    try:
        chat(model, image, args.max_new_tokens, interactive)
    except KeyboardInterrupt:
        print()


if __name__ == "__main__":
    main()
