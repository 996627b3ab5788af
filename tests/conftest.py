"""Test setup: 8 simulated CPU devices and exact fp32 matmuls, fixed before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# A persistent compilation cache: the tiny models compile once per machine, not once per run.
# XLA:CPU compiles for the host's instruction set and its cache keys do not name the CPU, so the
# folder does: a cache made on an AVX-512 machine is never loaded on an AVX2 one.
def _cpu_tag() -> str:
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:12]


_COMPILE_CACHE = os.environ.get(
    "VITNT_JAX_TEST_COMPILE_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache", _cpu_tag())
)
if _COMPILE_CACHE:  # set VITNT_JAX_TEST_COMPILE_CACHE= (empty) to compile everything afresh
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:  # pytest-xdist already runs one worker per core: torch's own threads would only oversubscribe them
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:
    pass


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keeps every test's model and MTCNN-weight cache out of the user's ~/.cache."""
    old = os.environ.get("VITNT_JAX_CACHE")
    os.environ["VITNT_JAX_CACHE"] = str(tmp_path_factory.mktemp("vitnt_cache"))
    yield
    if old is None:
        os.environ.pop("VITNT_JAX_CACHE", None)
    else:
        os.environ["VITNT_JAX_CACHE"] = old


@pytest.fixture(scope="session")
def testing_config():
    from vitnt_jax.config import PRESETS

    return PRESETS["testing"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A converted checkpoint of the 'testing' layout with random weights (via the CVLface converter)."""
    import torch

    from converters import cvlface
    from vitnt_jax.config import PRESETS

    import torch_reference as tr

    root = tmp_path_factory.mktemp("tiny_model")
    model = tr.randomize(tr.FaceViT(PRESETS["testing"]), seed=11)
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, root / "model.pt")
    return cvlface.convert(root / "model.pt", root / "ckpt")
