"""math, fact, format and exact stay linear in the completion's length. In a subprocess under a generous wall
limit, each runs on 1 MB of adversarial text as configured (only a tail/head window is searched), then on 256 KiB
with its windows widened to the whole text, so the algorithms themselves are exercised at a size where the
quadratic brace rescans this replaces took tens of minutes (they took 3-8 s within the old 20,000-character
window). Times are measured in benchmarks/test_bench_rewards.py, never asserted."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[3]
N = 1 << 20
WIDE = 1 << 18

ADVERSARIAL = {
    "unclosed_boxed": "\\boxed{" * (N // 7),
    "unclosed_fbox_spaces": "\\fbox {{ " * (N // 9),
    "boxed_last_line": "x\n" + "\\boxed{" * (N // 7),
    "answer_whitespace": ("answer" + " " * 50) * (N // 56),
    "answer_is": "answer is " * (N // 10),
    "hashes": "#### " * (N // 5),
    "digits": "1" * N,
    "numbers_and_slashes": "1 / " * (N // 4),
    "thousands": "1,000" * (N // 5),
    "braces": "{" * (N // 2) + "}" * (N // 2),
    "marked_lines": "#### x\n" * (N // 7),
    "mixed": "\\boxed{1} #### answer is 3/4 {" * (N // 30),
}

# Without ptkernels/__init__ (torch): only the stdlib-only verifiers load, so the budget is the verifiers' alone.
_CHILD = """
import json, sys, types
repo = sys.argv[1]
for name, path in (("ptkernels", repo + "/ptkernels"), ("ptkernels.trainers", repo + "/ptkernels/trainers")):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from ptkernels.trainers.rewards import verifiers as V
texts = json.loads(sys.stdin.read())
row = {"answer": "42", "facts": {"k": "paris"}, "fact_key": "k"}
for size in (None, int(sys.argv[2])):
    if size is not None:
        V.MAX_ANSWER_SEARCH_CHARS = V.MAX_FORMAT_CHARS = 1 << 22  # the whole text, not the tail
    for name, text in texts.items():
        for verifier in ("math", "fact", "format", "exact"):
            assert 0.0 <= V.get_verifier(verifier)(text[:size], row) <= 1.0
            print(name, verifier, flush=True)
"""


def test_verifiers_are_linear_on_a_megabyte_of_adversarial_text():
    res = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(REPO), str(WIDE)], input=json.dumps(ADVERSARIAL),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.splitlines()) == 2 * 4 * len(ADVERSARIAL)
