"""chat.py as a person uses it: a real process at a terminal, two turns then Ctrl-D, each answer
equal to pretrained.ask with the conversation so far and printed with its vision weight; `clear`
and `exit` in the chat (piped input); --question for scripts; --help explaining every flag. The
run is test_pretrained.py's short tiny train.py run (trained once per session)."""
import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

import chat
import pretrained
from test_pretrained import COLOUR_Q, SHAPE_Q, shape_image, tiny_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = re.compile(r"^ASSISTANT: (.*?)    \[vision (\d\.\d\d) \| language (\d\.\d\d)\]$", re.M)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "shape.png"
    shape_image("red", "triangle").save(path)
    return str(path)


@pytest.fixture(scope="module")
def expected(run, image):
    """What the chat must print: ask's answers, the second turn asked with the first in its history."""
    model = pretrained.load(run)
    first = model.ask(image, SHAPE_Q, return_dict=True)
    second = model.ask(image, COLOUR_Q, return_dict=True, history=[(SHAPE_Q, first.answer)])
    alone = model.ask(image, COLOUR_Q, return_dict=True)
    return [(o.answer, f"{o.context_weights[0]:.2f}", f"{o.context_weights[1]:.2f}") for o in (first, second, alone)]


def test_two_turns_at_a_terminal_keep_the_history_and_ctrl_d_leaves(run, image, expected):
    """A person at a terminal (a pseudo-terminal: input() with its prompt, readline): two turns,
    each answer printed with its weights, then Ctrl-D."""
    leader, follower = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), "--ckpt", run, "--image", image],
                            stdin=follower, stdout=follower, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(follower)
    screen = b""

    def read_until(pattern, timeout=240):
        nonlocal screen
        deadline = time.time() + timeout
        while not re.search(pattern, screen):
            assert time.time() < deadline and proc.poll() is None, screen.decode(errors="replace")
            if select.select([leader], [], [], 1)[0]:
                screen += os.read(leader, 4096)
    try:
        read_until(rb"USER: $")
        os.write(leader, SHAPE_Q.encode() + b"\n")
        read_until(rb"ASSISTANT: .*\]\r?\nUSER: $")
        os.write(leader, COLOUR_Q.encode() + b"\n")
        read_until(rb"(ASSISTANT: .*\]\r?\n(.|\n)*){2}USER: $")
        os.write(leader, b"\x04")  # Ctrl-D: end of input
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = screen.decode().replace("\r\n", "\n")
    assert ANSWER.findall(text) == expected[:2], text
    assert "template vicuna_v1" in text and "Traceback" not in text
    assert expected[1] != expected[2]  # the second turn read the first: its weights are not the lone question's


def test_clear_starts_over_and_exit_leaves(run, image, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{SHAPE_Q}\nclear\n{COLOUR_Q}\nexit\n{SHAPE_Q}\n"))
    chat.main(["--ckpt", run, "--image", image])
    out = capsys.readouterr().out
    assert "(conversation cleared; same image)" in out
    assert ANSWER.findall(out) == [expected[0], expected[2]]  # after clear, the question is asked alone; none after exit


def test_question_answers_once_and_help_explains_every_flag(run, image, expected, capsys):
    chat.main(["--ckpt", run, "--image", image, "--question", SHAPE_Q])
    assert capsys.readouterr().out == expected[0][0] + "\n"  # the bare answer, for scripts
    with pytest.raises(SystemExit) as e:
        chat.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in chat.build_parser()._actions:
        assert action.help and len(action.help) > 15, action.option_strings
        assert action.option_strings[-1] in text
    with pytest.raises(SystemExit, match="--image: cannot read image"):
        chat.main(["--ckpt", run, "--image", os.path.join(ROOT, "README.md")])
