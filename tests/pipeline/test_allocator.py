"""`pipeline.allocator`: the memory allocator an `nppnet` process runs with
(which one is asked for, the environment that puts it in place, and the
re-execution that applies it)."""

import os
import subprocess
import sys

import pytest

from pipeline import allocator
from pipeline.cli import build_parser


@pytest.fixture
def clean_env(monkeypatch):
    for key in (
        allocator.ENV_CHOICE,
        allocator.ENV_ACTIVE,
        "LD_PRELOAD",
        "TF_ONEDNN_USE_SYSTEM_ALLOCATOR",
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_requested_default_environment_and_flag(clean_env):
    assert allocator.requested([]) == allocator.DEFAULT == "tcmalloc"
    clean_env.setenv(allocator.ENV_CHOICE, "jemalloc")
    assert allocator.requested(["run"]) == "jemalloc"
    assert allocator.requested(["--allocator", "tensorflow", "run"]) == (
        "tensorflow"
    )
    assert allocator.requested(["--allocator=tcmalloc", "run"]) == "tcmalloc"
    # The value of another global option is not the command.
    assert allocator.requested(
        ["--log-level", "WARNING", "--allocator", "tensorflow", "bench"]
    ) == ("tensorflow")
    # Options after the command belong to the command, not to nppnet.
    assert allocator.requested(["bench", "--allocator", "tcmalloc"]) == (
        "jemalloc"
    )


def test_unknown_allocator_names_its_source(clean_env):
    with pytest.raises(ValueError, match=r"--allocator: unknown allocator 'x'"):
        allocator.requested(["--allocator", "x", "run"])
    clean_env.setenv(allocator.ENV_CHOICE, "mimalloc")
    with pytest.raises(ValueError, match=r"\$NPPNET_ALLOCATOR: .*'mimalloc'"):
        allocator.requested(["run"])


def test_environment_adds_and_removes_only_its_own_settings(clean_env):
    clean_env.setattr(
        allocator,
        "library",
        lambda choice: {"tcmalloc": "libtc.so", "jemalloc": "libje.so"}.get(
            choice
        ),
    )
    base = {"LD_PRELOAD": "libuser.so", "PATH": "/bin"}
    tc = allocator.environment("tcmalloc", base)
    assert tc["LD_PRELOAD"] == "libtc.so:libuser.so"
    assert tc["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "1"
    assert tc[allocator.ENV_ACTIVE] == "tcmalloc"
    # A child nppnet started with it asks for tcmalloc: no re-execution.
    assert tc[allocator.ENV_CHOICE] == "tcmalloc"
    je = allocator.environment("jemalloc", tc)
    assert je["LD_PRELOAD"] == "libje.so:libuser.so"
    back = allocator.environment("tensorflow", je)
    assert back["LD_PRELOAD"] == "libuser.so"
    assert "TF_ONEDNN_USE_SYSTEM_ALLOCATOR" not in back
    assert back[allocator.ENV_ACTIVE] == "tensorflow"
    assert back["PATH"] == "/bin"
    clean_env.setattr(allocator, "library", lambda choice: None)
    assert allocator.environment("tcmalloc", base) is None


def test_missing_library_falls_back_with_a_warning(clean_env, caplog):
    clean_env.setattr(allocator, "library", lambda choice: None)
    allocator.use("jemalloc")  # would re-execute if the library existed
    assert allocator.active() == "tensorflow"
    assert "jemalloc requested but libjemalloc is not installed" in caplog.text


def test_cli_accepts_the_global_option():
    args = build_parser().parse_args(
        ["--allocator", "jemalloc", "bench", "model", "--list"]
    )
    assert args.allocator == "jemalloc"


@pytest.mark.skipif(
    allocator.library("tcmalloc") is None, reason="tcmalloc not installed"
)
def test_use_re_executes_the_same_process_with_the_library(clean_env):
    """The re-executed process keeps its PID and has tcmalloc mapped."""
    code = (
        "import os, sys\n"
        "from pipeline import allocator\n"
        "print('pid', os.getpid(), flush=True)\n"
        "allocator.use('tcmalloc')\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('mapped', 'libtcmalloc' in maps)\n"
        "print('active', allocator.active())\n"
        "print('system', os.environ['TF_ONEDNN_USE_SYSTEM_ALLOCATOR'])\n"
        "allocator.release_free_memory()  # tcmalloc's own release\n"
        "print('released')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
        cwd=os.getcwd(),
    )
    lines = done.stdout.split("\n")
    pids = [line for line in lines if line.startswith("pid")]
    assert len(pids) == 2 and pids[0] == pids[1]  # printed before and after
    assert "mapped True" in lines
    assert "active tcmalloc" in lines
    assert "system 1" in lines
    assert "released" in lines


def test_release_free_memory_without_a_preload():
    allocator.release_free_memory()  # glibc only: must not fail


def test_benchmark_children_killed_by_a_signal_keep_their_reason():
    from pipeline.bench import signal_error

    killed = signal_error(-9, "I0000 XLA service initialized\n")
    assert killed == (
        "killed by signal 9 (SIGKILL: the kernel's out-of-memory killer, "
        "or by hand)"
    )
    stderr = "start-up noise\n\ntcmalloc: allocation failed 4096\n"
    assert signal_error(-6, stderr) == (
        "killed by signal 6: start-up noise | tcmalloc: allocation failed 4096"
    )


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_benchmark_child_result_is_its_last_json_line():
    from pipeline.bench import run_child

    code = "print('noise'); print('{\"a\": 1}'); print('{\"a\": 2}')"
    assert run_child(_child(code), "tensorflow", timeout=60) == {"a": 2}


def test_benchmark_child_failures_become_result_fields():
    from pipeline.bench import run_child

    abort = "import os, sys; sys.stderr.write('heap corrupted\\n'); " + (
        "sys.stderr.flush(); os.abort()"
    )
    aborted = run_child(_child(abort), "tensorflow", timeout=60)
    assert aborted["status"] == "failed"
    assert aborted["error"] == "killed by signal 6: heap corrupted"

    exited = run_child(
        _child("import sys; sys.exit('no such variant')"), "tensorflow", 60
    )
    assert exited["status"] == "failed"
    assert exited["error"] == "exit 1: no such variant"

    silent = run_child(_child("print('not json')"), "tensorflow", 60)
    assert silent["error"] == "exit 0: not json"

    slow = run_child(_child("import time; time.sleep(30)"), "tensorflow", 1)
    assert slow["status"] == "timeout"
    assert slow["error"] == "no result within 1 s"


def test_a_killed_benchmark_child_leaves_its_peak_memory():
    from pipeline.bench import peak_at_failure, run_child

    # 256 MiB touched page by page, then the SIGKILL the OOM killer would send
    code = (
        "import os, signal, sys, time; block = bytearray(256 * 2**20); "
        "print('start-up noise', file=sys.stderr, flush=True); "
        "time.sleep(1.0); os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = run_child(_child(code), "tensorflow", timeout=60)
    assert killed["status"] == "failed"
    assert killed["error"] == (
        "killed by signal 9 (SIGKILL: the kernel's out-of-memory killer, "
        "or by hand)"
    )
    assert 0.25 <= killed["peak_rss_gib_seen"] < 1.0
    assert peak_at_failure(killed) == (
        f"{killed['peak_rss_gib_seen']:.2f} (at failure)"
    )

    slow = "block = bytearray(128 * 2**20); import time; time.sleep(30)"
    stopped = run_child(_child(slow), "tensorflow", timeout=2)
    assert stopped["status"] == "timeout"
    assert stopped["peak_rss_gib_seen"] >= 0.125


def test_failed_model_variants_show_their_peak_in_the_table():
    from pipeline.bench import model

    failed = {
        "variant": "encoder-decoder-train-b2-256-xla",
        "xla": True,
        "allocator": "tcmalloc",
        "status": "failed",
        "error": "killed by signal 9",
        "peak_rss_gib_seen": 22.94,
    }
    table = model.format_table([failed])
    assert table.splitlines()[-1] == (
        "| encoder-decoder-train-b2-256 | on | tcmalloc | killed by signal 9 "
        "| | | 22.94 (at failure) | |"
    )
    assert model._describe(failed) == "failed, peak 22.94 GiB seen"
