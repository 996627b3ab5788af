"""Test setup: 8 simulated CPU devices and exact fp32 matmuls, fixed before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def testing_config():
    from vitnt_jax.config import PRESETS

    return PRESETS["testing"]
