"""``needs_bwrap``: a test that runs code in the sandbox is skipped where bubblewrap is missing or unusable (a user's
machine, the GPU image), with the reason; under ``PTK_REQUIRE_SANDBOX=1`` (CI sets it once it has installed
bubblewrap) it runs anyway, so a sandbox that stopped working fails there instead of being skipped."""

import os

import pytest

from ptkernels.trainers.rewards.sandbox import sandbox_info

SANDBOX_REQUIRED = os.environ.get("PTK_REQUIRE_SANDBOX") == "1"
needs_bwrap = pytest.mark.skipif(
    not SANDBOX_REQUIRED and sandbox_info()["isolation"] != "bubblewrap",
    reason="bubblewrap is missing or unusable here (`ptk check-sandbox` says why; CI installs it: .ci/run)")
