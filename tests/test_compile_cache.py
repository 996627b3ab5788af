"""JAX's persistent compilation cache: where it goes, "off", unusable folders, and a second process loading from it."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from vitnt_jax import cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_jax_cache_settings():
    """Every test leaves JAX's cache settings (the test session's own cache) as it found them."""
    before = cache._current()
    yield
    cache._apply(*before)


def _entries(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith("-cache")) if Path(folder).is_dir() else []


def test_folder_for_each_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "home"))
    tag = cache.cpu_tag()
    assert cache.compile_cache_dir(None) == str(tmp_path / "home" / "xla" / tag)
    assert cache.compile_cache_dir(tmp_path / "mine") == str(tmp_path / "mine" / tag)
    assert cache.compile_cache_dir("file://" + str(tmp_path / "mine")) == str(tmp_path / "mine" / tag)
    assert cache.compile_cache_dir("gs://bucket/xla/") == f"gs://bucket/xla/{tag}"
    assert cache.compile_cache_dir("off") is None
    assert tag == cache.cpu_tag() and "/" not in tag


def test_enable_sets_and_off_clears_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.MIN_COMPILE_TIME_ENV, raising=False)
    folder = cache.enable_compile_cache(tmp_path / "xla")
    assert folder == str(tmp_path / "xla" / cache.cpu_tag())
    assert jax.config.jax_compilation_cache_dir == folder
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cache.MIN_COMPILE_TIME_S
    assert cache.MIN_COMPILE_TIME_S < 1  # JAX's default would skip the small models' programs on CPUs
    assert Path(folder).is_dir() and Path(folder).stat().st_mode & 0o077 == 0
    assert cache.enable_compile_cache(tmp_path / "xla") == folder  # idempotent
    assert cache.enable_compile_cache("off") is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_threshold_set_by_the_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.MIN_COMPILE_TIME_ENV, "2.5")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.5)  # what JAX read from it at import
    cache.enable_compile_cache(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5


def test_default_keeps_a_folder_configured_already(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "home"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "session"))
    assert cache.enable_compile_cache(None) == str(tmp_path / "session")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "session")
    assert not (tmp_path / "home").exists()
    jax.config.update("jax_compilation_cache_dir", None)  # nothing configured: the default folder
    assert cache.enable_compile_cache(None) == str(tmp_path / "home" / "xla" / cache.cpu_tag())


def test_default_keeps_jax_cache_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "home"))
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", False)
    assert cache.enable_compile_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "home").exists()
    assert cache.enable_compile_cache(tmp_path / "named") is not None  # a folder the user names turns it on
    assert jax.config.jax_enable_compilation_cache


def test_block_puts_the_previous_settings_back(tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "session"))
    with cache.compile_cache("off") as folder:
        assert folder is None and jax.config.jax_compilation_cache_dir is None
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "session")
    with cache.compile_cache(tmp_path / "other") as folder:
        assert jax.config.jax_compilation_cache_dir == folder
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "session")


def test_a_named_folder_that_cannot_be_made_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(cache.CompileCacheError) as caught:
        cache.enable_compile_cache(tmp_path / "file" / "xla")
    message = caught.value.render({"compile_cache": "--compile-cache"})
    assert message.startswith(f"--compile-cache {tmp_path / 'file' / 'xla' / cache.cpu_tag()} cannot be created (")
    assert message.endswith("; give a folder only you can write, or off to compile without a cache.")
    assert "\n" not in message
    assert jax.config.jax_compilation_cache_dir != str(tmp_path / "file" / "xla" / cache.cpu_tag())


def test_an_empty_setting_is_one_sentence():
    with pytest.raises(cache.CompileCacheError) as caught:
        cache.enable_compile_cache("")
    assert caught.value.render({"compile_cache": "--compile-cache"}) == (
        "--compile-cache is empty; give a folder, or off to compile without a cache."
    )


def test_a_folder_every_user_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared" / cache.cpu_tag()
    shared.mkdir(parents=True)
    shared.chmod(0o1777)
    with pytest.raises(cache.CompileCacheError, match="writable by every user"):
        cache.enable_compile_cache(tmp_path / "shared")


def test_a_folder_in_a_folder_anyone_may_rename_in_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)  # no sticky bit: anyone may rename what it holds
    with pytest.raises(cache.CompileCacheError, match="lies in a folder every user can write"):
        cache.enable_compile_cache(tmp_path / "open")
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)  # like /tmp: only the owner may rename its own entries
    assert cache.enable_compile_cache(tmp_path / "sticky") == str(tmp_path / "sticky" / cache.cpu_tag())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a folder away")
def test_a_folder_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs" / cache.cpu_tag()
    theirs.mkdir(parents=True)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(cache.CompileCacheError, match=r"belongs to another user \(uid 12345\)"):
        cache.enable_compile_cache(tmp_path / "theirs")


def test_an_unusable_default_folder_warns_and_compiles_without_cache(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "file"))
    jax.config.update("jax_compilation_cache_dir", None)
    with caplog.at_level(logging.WARNING, logger="vitnt_jax.cache"):
        assert cache.enable_compile_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None
    [record] = [r for r in caplog.records if r.name == "vitnt_jax.cache"]
    assert record.getMessage().startswith("compiling without a cache: the cache folder ")
    assert "cannot be created" in record.getMessage()


def test_a_url_without_epath_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "etils", None)  # as where etils is not installed
    monkeypatch.setitem(sys.modules, "etils.epath", None)
    with pytest.raises(cache.CompileCacheError, match=r"gs://bucket/xla is not a local folder.*etils\[epath\]"):
        cache.enable_compile_cache("gs://bucket/xla")


def test_switching_folders_after_compiling(tmp_path):
    first = cache.enable_compile_cache(tmp_path / "a")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # these compile in milliseconds
    jax.jit(lambda x: x * 3.25 + 0.5)(np.arange(7, dtype=np.float32)).block_until_ready()
    assert len(_entries(first)) == 1
    second = cache.enable_compile_cache(tmp_path / "b")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: x * 3.25 - 0.5)(np.arange(7, dtype=np.float32)).block_until_ready()
    assert len(_entries(second)) == 1 and len(_entries(first)) == 1
    cache.enable_compile_cache("off")
    jax.jit(lambda x: x * 3.25 - 1.5)(np.arange(7, dtype=np.float32)).block_until_ready()
    assert len(_entries(first)) == 1 and len(_entries(second)) == 1


_DRIVER = """
import json, sys
import jax, numpy as np
from vitnt_jax import cache, pipeline
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
folder = cache.enable_compile_cache(sys.argv[1])
scorer = pipeline.load_scorer(sys.argv[2])
q = pipeline.score_array(scorer, np.full((3, 32, 32, 3), 100, np.uint8), batch_size=4)["quality"]
print(json.dumps({"folder": folder, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"), "quality": q.tolist()}))
"""


def test_a_second_process_loads_the_programs_from_the_cache(tmp_path, tiny_checkpoint):
    env = {**os.environ, cache.CACHE_ENV: str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env[cache.MIN_COMPILE_TIME_ENV] = "0"  # every program, however fast this machine compiles it (kept by the call)

    def run() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", _DRIVER, str(tmp_path / "xla"), str(tiny_checkpoint)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    written = _entries(first["folder"])
    assert first["misses"] >= 1 and len(written) >= 1
    second = run()
    assert second["hits"] >= 1 and second["misses"] == 0
    assert _entries(second["folder"]) == written  # nothing compiled afresh
    np.testing.assert_array_max_ulp(np.float32(second["quality"]), np.float32(first["quality"]), maxulp=2)


def _cli(args, env, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "vitnt_jax.score", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_a_cli_run_keeps_its_programs_in_the_cache_folder_by_default(tmp_path, tiny_checkpoint):
    from helpers import png_bytes, smooth_faces

    (tmp_path / "faces").mkdir()
    for k, face in enumerate(smooth_faces(3)):
        (tmp_path / "faces" / f"{k}.png").write_bytes(png_bytes(face))
    env = {**os.environ, cache.CACHE_ENV: str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env[cache.MIN_COMPILE_TIME_ENV] = "0"  # every program, however fast this machine compiles it
    args = ["--images", str(tmp_path / "faces"), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "q.csv")]
    done = _cli(args, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _entries(tmp_path / "home" / "xla" / cache.cpu_tag())  # on by default, under $VITNT_JAX_CACHE


def test_a_cli_run_with_an_unusable_cache_folder_stops_with_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = _cli(
        [
            "--images",
            str(tmp_path),
            "--model",
            "testing",
            "--out",
            str(tmp_path / "q.csv"),
            "--compile-cache",
            str(tmp_path / "file" / "xla"),
        ],
        env,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"error: --compile-cache {tmp_path / 'file' / 'xla' / cache.cpu_tag()} cannot be created (Not a directory); "
        "give a folder only you can write, or off to compile without a cache."
    ]


def test_file_urls_follow_the_storage_rules(tmp_path):
    from vitnt_jax import cache

    assert cache.compile_cache_dir(f"file://{tmp_path}/xla") == str(tmp_path / "xla" / cache.cpu_tag())
    with pytest.raises(cache.CompileCacheError, match="names the host 'host'"):
        cache.compile_cache_dir("file://host/xla")
