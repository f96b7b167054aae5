"""Compare ptkernels' hand-written math verifier with Hugging Face's ``math-verify`` on a held-out set of answer
formats (gold as data sets write it, completion as models write it, and whether they agree).

    pip install math-verify==0.9.0 && python -m tools.compare_math_verifiers

The cases were written for this comparison, not taken from either project's tests. Prints each verifier's
agreement with the expected verdict, per format family, its false positives, and the time per call.
"""

from __future__ import annotations

import time

from ptkernels.trainers.rewards.verifiers import math as hand_math

# (family, gold, completion, expected)
CASES = [
    ("integer", "72", "So she sold 72 clips.", True),
    ("integer", "72", "So she sold 73 clips.", False),
    ("gsm8k", "48/2 = <<48/2=24>>24 in May\n#### 72", "In total 72. #### 72", True),
    ("gsm8k", "#### 1,080", "The answer is 1080.", True),
    ("gsm8k", "#### 1080", "The answer is $1,080.", True),
    ("gsm8k", "#### 5", "The answer is 15.", False),
    ("gsm8k", "#### -3", "Answer: -3", True),
    ("boxed", "\\boxed{\\frac{1}{2}}", "Thus \\boxed{\\dfrac{1}{2}}.", True),
    ("boxed", "\\boxed{\\frac{1}{2}}", "Thus \\boxed{0.5}.", True),
    ("boxed", "\\boxed{\\frac{1}{3}}", "Thus \\boxed{0.3333333}.", True),
    ("boxed", "\\boxed{\\frac{2}{3}}", "Thus \\boxed{\\frac{3}{2}}.", False),
    ("boxed", "so $\\boxed{12}$", "\\boxed{12\\text{ cm}}", True),
    ("boxed", "\\boxed{25\\%}", "\\boxed{25}", True),
    ("decimal", "3.50", "It costs $3.5.", True),
    ("decimal", "0.1", "the answer is .1", True),
    ("decimal", "2.5", "the answer is 2.05", False),
    ("fraction", "3/4", "Answer: \\frac34", True),
    ("fraction", "3/4", "Answer: 6/8", True),
    ("expression", "\\boxed{2\\sqrt{3}}", "\\boxed{\\sqrt{12}}", True),
    ("expression", "\\boxed{\\sqrt{2}}", "\\boxed{\\sqrt{3}}", False),
    ("expression", "\\boxed{\\pi}", "\\boxed{\\pi}", True),
    ("expression", "\\boxed{2\\pi}", "\\boxed{\\pi \\cdot 2}", True),
    ("expression", "\\boxed{x+1}", "\\boxed{1+x}", True),
    ("expression", "\\boxed{x^2-1}", "\\boxed{(x-1)(x+1)}", True),
    ("expression", "\\boxed{x+1}", "\\boxed{x+2}", False),
    ("set", "\\boxed{(1,2)}", "\\boxed{(1, 2)}", True),
    ("set", "\\boxed{[0,1)}", "\\boxed{[0, 1)}", True),
    ("set", "\\boxed{\\{1,2\\}}", "\\boxed{\\{2,1\\}}", True),
    ("set", "\\boxed{(1,2)}", "\\boxed{(2,1)}", False),
    ("equation", "\\boxed{x=5}", "\\boxed{5}", True),
    ("equation", "5", "so x = 5", True),
    ("text", "\\boxed{\\text{Tuesday}}", "\\boxed{\\text{Tuesday}}", True),
    ("text", "\\boxed{\\text{(B)}}", "The answer is (B)", True),
    ("degrees", "\\boxed{90^\\circ}", "\\boxed{90}", True),
    ("scientific", "\\boxed{1.5\\times10^{3}}", "\\boxed{1500}", True),
    ("last number", "42", "First 7, then 12, finally 42", True),
    ("last number", "42", "42 is wrong; it is 41", False),
]


def math_verify_verdict(gold: str, completion: str) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(completion)))


def main() -> None:
    verdicts = {"hand": [], "math-verify": []}
    times = {"hand": 0.0, "math-verify": 0.0}
    for _family, gold, completion, _expected in CASES:
        for name, fn in (("hand", lambda g, c: hand_math(c, {"answer": g}) == 1.0),
                         ("math-verify", math_verify_verdict)):
            t = time.perf_counter()
            try:
                got = fn(gold, completion)
            except Exception as e:  # noqa: BLE001 - a crash counts as a wrong verdict, and is shown
                got = f"error: {type(e).__name__}"
            times[name] += time.perf_counter() - t
            verdicts[name].append(got)
    families = sorted({c[0] for c in CASES}, key=[c[0] for c in CASES].index)
    print(f"{'family':<12} {'n':>3} {'hand':>6} {'math-verify':>12}")
    for fam in families:
        idx = [i for i, c in enumerate(CASES) if c[0] == fam]
        row = [sum(verdicts[n][i] == CASES[i][3] for i in idx) for n in verdicts]
        print(f"{fam:<12} {len(idx):>3} {row[0]:>6} {row[1]:>12}")
    for name, got in verdicts.items():
        right = sum(g == c[3] for g, c in zip(got, CASES))
        fp = sum(g is True and not c[3] for g, c in zip(got, CASES))
        print(f"{name}: {right}/{len(CASES)} agree, {fp} false positives, "
              f"{1e3 * times[name] / len(CASES):.2f} ms per call")
        for g, c in zip(got, CASES):
            if g != c[3]:
                print(f"   wrong: {c[0]:<11} gold={c[1]!r} completion={c[2]!r} -> {g}")


if __name__ == "__main__":
    main()
