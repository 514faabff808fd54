"""``ringattn compile`` (``backends/_compile_cli.py``): its arguments, its errors, and the cache it shows and clears
(Note [kernel cache] in ``backends/_kernel_cache.py``). The compiles themselves are stubbed here except in one
`slow` test; ``tests/test_cold_start.py`` tests the cache across processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringattn import cli
from ringattn.backends import _compile_cli, _kernel_cache


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "kernels"
    monkeypatch.setenv(_kernel_cache.CACHE_ENV, str(cache))
    return cache


def test_where_prints_the_cache_directory(private_cache, capsys, monkeypatch) -> None:
    assert cli.main(["compile", "--where"]) == 0
    assert capsys.readouterr().out.strip() == str(private_cache)
    monkeypatch.delenv(_kernel_cache.CACHE_ENV)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert _kernel_cache.cache_dir() == Path("/somewhere/ringattn/numba")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _kernel_cache.cache_dir() == Path.home() / ".cache" / "ringattn" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/numba-wide")  # the user's numba-wide choice: numba's locator decides
    assert _kernel_cache.cache_dir() is None and _kernel_cache.effective_dir() == Path("/numba-wide")


def test_clear_deletes_only_ringattns_own_directory(private_cache, capsys, monkeypatch) -> None:
    (private_cache / "ringattn.backends").mkdir(parents=True)
    (private_cache / "ringattn.backends" / "numba_cpu._merge_rows_kernel-1.py311.nbi").write_bytes(b"x")
    assert cli.main(["compile", "--clear"]) == 0
    assert not private_cache.exists() and "cleared" in capsys.readouterr().out
    monkeypatch.delenv(_kernel_cache.CACHE_ENV)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(private_cache))
    private_cache.mkdir()
    assert cli.main(["compile", "--clear"]) == 1  # shared with other packages: refused, with the way out
    assert private_cache.exists() and _kernel_cache.CACHE_ENV in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,named",
    [
        (["--dtype", "int8"], "--dtype"),
        (["--dtype", ""], "--dtype"),
        (["--parts", "0"], "--parts"),
        (["--parts", "two"], "--parts"),
        (["--direction", "sideways"], "--direction"),
        (["--form", "logits"], "--form"),
    ],
)
def test_bad_arguments_name_the_option(args, named, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["compile", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "expected" in err


def test_compiles_what_is_named(private_cache, capsys, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(_compile_cli, "compile_kernel", lambda *a: calls.append(a))
    assert cli.main(["compile", "--dtype", "bf16,fp16,bf16", "--parts", "1,2,4", "--direction", "backward"]) == 0
    assert calls == [(dt, k, "backward", "stats") for dt in (torch.bfloat16, torch.float16) for k in (2, 4)]
    out = capsys.readouterr().out
    assert "K=1: no kernel" in out and "bfloat16 K=4 backward: ready" in out
    calls.clear()
    assert cli.main(["compile", "--form", "lse", "--dtype", "float64"]) == 0  # the LSE form alone: its own run
    assert calls == [(torch.float64, 2, "forward", "lse"), (torch.float64, 2, "backward", "lse")]
    calls.clear()
    assert cli.main(["compile"]) == 0  # defaults: float32 and bfloat16, K = 2, both directions
    assert calls == [(dt, 2, d, "stats") for dt in (torch.float32, torch.bfloat16) for d in ("forward", "backward")]


@pytest.mark.slow
def test_a_real_compile_lands_in_the_named_cache(private_cache) -> None:
    """``ringattn compile`` in a fresh process writes the kernel's files to the private directory."""
    env = {**__import__("os").environ}
    run = subprocess.run(
        [sys.executable, "-m", "ringattn", "compile", "--dtype", "float32", "--parts", "2", "--direction", "forward"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "float32 K=2 forward: ready" in run.stdout
    assert list(private_cache.glob("ringattn.backends-*/numba_cpu._merge_rows_kernel-*.nbi"))
