"""Test set-up: eight fake CPU devices, so sharded code runs on a mesh without accelerators.

XLA reads the flag when jax first starts, and pytest imports this file before any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
