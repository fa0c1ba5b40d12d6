"""Settings for the property-based tests (tests/test_properties_*.py, hypothesis).

Two profiles: "ci" (the default) draws a fixed number of examples from a fixed seed
(derandomize=True), so every run tries the same inputs and a failure reproduces; "explore"
(HYPOTHESIS_PROFILE=explore) draws ten times as many, fresh each run, to hunt for new bugs
locally. No deadline: the machine is shared and a first call may load a model. No example
database: nothing is written into the checkout.
"""
import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the test extra is not installed: the property modules skip themselves
    settings = None

# examples per property in CI (a test can ask for a multiple of it: cheap ones draw more)
MAX_EXAMPLES = 25

if settings is not None:
    settings.register_profile("ci", max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("explore", max_examples=10 * MAX_EXAMPLES, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
