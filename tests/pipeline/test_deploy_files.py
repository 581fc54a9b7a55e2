"""The scheduling files: wrapper script, cron and systemd units, docs/scheduling.md.

The wrapper runs against a fake `.venv/bin/nppnet` (a shell script that
exits with a chosen code) and a fake `logger`, so no pipeline runs.
"""

import configparser
import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "deploy" / "nppnet-scheduled-run"
CRONTAB = ROOT / "deploy" / "cron" / "nppnet.crontab"
SYSTEMD = ROOT / "deploy" / "systemd"
SERVICE = SYSTEMD / "nppnet-pipeline.service"
TIMER = SYSTEMD / "nppnet-pipeline.timer"
PATH_UNIT = SYSTEMD / "nppnet-pipeline.path"
DOC = ROOT / "docs" / "scheduling.md"

FAKE_NPPNET = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_ARGS"
echo "fake nppnet output"
echo "12:00:00 ERROR pipeline.commands.run: fake cause $FAKE_CODE" >&2
if [[ -n "${FAKE_STARTED:-}" ]]; then
  trap 'echo "fake nppnet: checkpoint saved"; exit 143' TERM
  touch "$FAKE_STARTED"
  sleep 30 & wait
fi
exit "$FAKE_CODE"
"""

FAKE_LOGGER = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_LOGGER_OUT"
"""


def _write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_home(tmp_path):
    """A checkout with a fake nppnet, a bin dir with a fake logger, and the
    environment the wrapper runs with."""
    home = tmp_path / "home"
    _write_executable(home / ".venv" / "bin" / "nppnet", FAKE_NPPNET)
    bin_dir = tmp_path / "bin"
    _write_executable(bin_dir / "logger", FAKE_LOGGER)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NPPNET_") and k != "INVOCATION_ID"
    }
    env.update(
        PATH=f"{bin_dir}:/usr/bin:/bin",
        NPPNET_HOME=str(home),
        FAKE_ARGS=str(tmp_path / "args.txt"),
        FAKE_LOGGER_OUT=str(tmp_path / "logger.txt"),
        FAKE_CODE="0",
    )
    return home, env, tmp_path


def _run_wrapper(env, *args, wrapper=WRAPPER):
    return subprocess.run(
        [str(wrapper), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _logger_lines(tmp_path):
    path = tmp_path / "logger.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_wrapper_is_executable_bash_and_parses():
    assert os.access(WRAPPER, os.X_OK)
    text = WRAPPER.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(WRAPPER)], check=True, timeout=30)


@pytest.mark.parametrize(
    "code, locked_exit, expected, priority, mails",
    [
        (0, None, 0, "info", False),
        (1, None, 1, "err", True),
        (2, None, 2, "err", True),
        (3, None, 3, "err", True),
        (4, None, 4, "notice", True),
        (5, None, 0, "notice", False),
        (5, "5", 5, "notice", False),
        (143, None, 143, "warning", True),
        (9, None, 9, "err", True),
    ],
)
def test_wrapper_maps_exit_codes(
    fake_home, code, locked_exit, expected, priority, mails
):
    home, env, tmp_path = fake_home
    env["FAKE_CODE"] = str(code)
    env["NPPNET_LIP_ROOT"] = "/data/LIP with space"
    if locked_exit is not None:
        env["NPPNET_LOCKED_EXIT"] = locked_exit
    result = _run_wrapper(env, "--set", "train.epochs=3")
    assert result.returncode == expected, result.stderr

    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args == [
        "run",
        "--config",
        "configs/lip.yaml",
        "--lip-root",
        "/data/LIP with space",
        "--set",
        "train.epochs=3",
    ]
    (line,) = _logger_lines(tmp_path)
    assert line.startswith(f"-t nppnet-scheduled-run -p user.{priority} -- ")
    assert f"nppnet run configs/lip.yaml: exit {code}," in line
    if code:
        assert f"(fake cause {code})" in line
    else:
        assert "fake cause" not in line  # an ERROR line of a good run
    assert "\n" not in line

    (log,) = (home / "runs" / "logs").glob("nppnet-run-*.log")
    assert re.fullmatch(r"nppnet-run-\d{4}-\d{2}-\d{2}\.log", log.name)
    assert str(log) in line
    text = log.read_text()
    assert "fake nppnet output" in text
    assert f"fake cause {code}" in text
    assert text.startswith("=== ")
    assert (
        text.rstrip()
        .splitlines()[-1]
        .split(" ", 3)[3]
        .startswith(f"exit {code}:")
    )
    if mails:  # cron mails any output: only failures and refusals
        assert f"exit {code}," in result.stderr
        assert "fake nppnet output" in result.stderr
    else:
        assert result.stderr == ""
    assert result.stdout == ""


def test_wrapper_appends_to_the_days_log(fake_home):
    home, env, _ = fake_home
    for code in ("0", "3"):
        env["FAKE_CODE"] = code
        _run_wrapper(env)
    (log,) = (home / "runs" / "logs").glob("nppnet-run-*.log")
    footers = [
        line for line in log.read_text().splitlines() if " exit " in line
    ]
    assert len(footers) == 2
    assert "exit 0:" in footers[0] and "exit 3:" in footers[1]


def test_wrapper_settings_from_environment(fake_home, tmp_path):
    home, env, _ = fake_home
    logs = tmp_path / "elsewhere" / "logs"
    env.update(
        NPPNET_CONFIG="configs/demo.yaml",
        NPPNET_LOG_DIR=str(logs),
        FAKE_CODE="1",
    )
    result = _run_wrapper(env)
    assert result.returncode == 1
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args == ["run", "--config", "configs/demo.yaml"]  # no --lip-root
    assert len(list(logs.glob("nppnet-run-*.log"))) == 1
    assert not (home / "runs").exists()


def test_wrapper_defaults_to_its_own_checkout(fake_home):
    home, env, tmp_path = fake_home
    del env["NPPNET_HOME"]
    copy = home / "deploy" / "nppnet-scheduled-run"
    copy.parent.mkdir()
    shutil.copy2(WRAPPER, copy)
    assert _run_wrapper(env, wrapper=copy).returncode == 0
    assert (tmp_path / "args.txt").exists()
    assert len(list((home / "runs" / "logs").glob("*.log"))) == 1


def test_wrapper_under_systemd_writes_journal_priority(fake_home):
    _, env, tmp_path = fake_home
    env.update(INVOCATION_ID="0123456789abcdef", FAKE_CODE="3")
    result = _run_wrapper(env)
    assert result.returncode == 3
    assert result.stderr.startswith(
        "<3>nppnet-scheduled-run: nppnet run configs/lip.yaml: exit 3,"
    )
    assert _logger_lines(tmp_path) == []  # the journal has it already


def test_wrapper_without_nppnet(fake_home):
    home, env, _ = fake_home
    (home / ".venv" / "bin" / "nppnet").unlink()
    result = _run_wrapper(env)
    assert result.returncode == 127
    assert "make env" in result.stderr


def test_wrapper_reports_a_stop_by_sigterm(fake_home):
    """systemctl stop signals every process of the unit: nppnet saves a
    checkpoint and exits 143, the wrapper outlives it and reports."""
    home, env, tmp_path = fake_home
    started = tmp_path / "started"
    env["FAKE_STARTED"] = str(started)
    process = subprocess.Popen(
        [str(WRAPPER)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "fake nppnet did not start"
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 143, stderr
    (log,) = (home / "runs" / "logs").glob("nppnet-run-*.log")
    text = log.read_text()
    assert "checkpoint saved" in text
    assert "exit 143: stopped by a signal" in text
    assert "user.warning" in _logger_lines(tmp_path)[0]


# ---------------------------------------------------------------------------
# systemd units


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of a key that systemd allows to repeat (Environment=)."""
    values, current = [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key}="):
            values.append(line.split("=", 1)[1])
    return values


def test_service_unit():
    unit = read_unit(SERVICE)
    assert unit["Unit"]["Description"]
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0].endswith("/deploy/nppnet-scheduled-run")
    assert exec_start[0].startswith(service["WorkingDirectory"] + "/")
    environment = dict(
        v.split("=", 1) for v in unit_values(SERVICE, "Service", "Environment")
    )
    assert environment["NPPNET_HOME"] == service["WorkingDirectory"]
    assert (ROOT / environment["NPPNET_CONFIG"]).is_file()
    assert "TF_CONFIG" not in environment
    for key in ("User", "Nice", "IOSchedulingClass", "TimeoutStopSec"):
        assert service[key], key
    assert service["TimeoutStartSec"] == "infinity"
    assert service["KillSignal"] == "SIGTERM"
    # mixed would signal only the wrapper, which does not forward.
    assert service.get("KillMode", "control-group") == "control-group"
    assert set(service["SuccessExitStatus"].split()) == {"4", "143"}


def test_timer_unit():
    unit = read_unit(TIMER)
    timer = unit["Timer"]
    assert timer["OnCalendar"] == "*-*-* 02:30:00"
    assert timer["Persistent"] == "true"
    assert timer["RandomizedDelaySec"]
    assert timer["Unit"] == SERVICE.name
    assert unit["Install"]["WantedBy"] == "timers.target"


def test_path_unit():
    unit = read_unit(PATH_UNIT)
    assert unit["Path"]["PathChanged"].startswith("/")
    assert unit["Path"]["Unit"] == SERVICE.name
    assert unit["Install"]["WantedBy"] == "paths.target"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="no systemd-analyze"
)
def test_units_pass_systemd_analyze_verify(tmp_path):
    """systemd's own parser, on copies pointing at this checkout and user."""
    user = getpass.getuser()
    for unit in (SERVICE, TIMER, PATH_UNIT):
        text = unit.read_text().replace("/opt/nppnet", str(ROOT))
        text = re.sub(r"(?m)^(User|Group)=.*$", rf"\1={user}", text)
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no"]
        + [f"./{unit.name}" for unit in (SERVICE, TIMER, PATH_UNIT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Only complaints about our units count (a container may lack others).
    ours = [line for line in result.stderr.splitlines() if "nppnet" in line]
    assert not ours, result.stderr


# ---------------------------------------------------------------------------
# crontab

CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def test_crontab():
    entries, variables = [], {}
    for line in CRONTAB.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z_]+)=(.*)", line)
        if match:
            variables[match[1]] = match[2]
        else:
            entries.append(line.split())
    assert len(entries) == 1
    (entry,) = entries
    times, command = entry[:5], entry[5:]
    assert all(CRON_FIELD.match(field) for field in times), times
    assert times[:2] == ["30", "2"]  # 02:30
    assert command[0].endswith("/deploy/nppnet-scheduled-run")
    assert command[0].startswith(variables["NPPNET_HOME"] + "/")
    assert "flock" not in command
    assert variables["MAILTO"] and variables["PATH"]
    assert (ROOT / variables["NPPNET_CONFIG"]).is_file()


# ---------------------------------------------------------------------------
# docs/scheduling.md


def test_every_config_mentioned_exists():
    mentioned = set()
    for path in (DOC, CRONTAB, SERVICE, WRAPPER):
        text = path.read_text()
        mentioned |= set(re.findall(r"--config[ =](configs/[\w./-]+)", text))
        mentioned |= set(re.findall(r"NPPNET_CONFIG=(configs/[\w./-]+)", text))
    assert "configs/lip.yaml" in mentioned
    missing = sorted(m for m in mentioned if not (ROOT / m).is_file())
    assert not missing, missing


def documented_commands() -> list[list[str]]:
    """`nppnet ...` lines of the doc's bash blocks, continuations joined."""
    commands, in_block, pending = [], False, ""
    for line in DOC.read_text().splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            in_block = not in_block and fence == "```bash"
            pending = ""
            continue
        if not in_block:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("nppnet "):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_documented_nppnet_commands_parse():
    from pipeline.cli import build_parser

    commands = documented_commands()
    names = {argv[0] for argv in commands}
    assert {"run", "search", "train", "data", "register"} <= names
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"nppnet {shlex.join(argv)}: exit {err.code}")


def test_doc_covers_every_exit_code_and_deploy_file():
    text = DOC.read_text()
    for code in ("0", "1", "2", "3", "4", "5", "130, 143"):
        assert re.search(rf"^\| {code} \|", text, re.M), code
    for path in (WRAPPER, CRONTAB, SERVICE, TIMER, PATH_UNIT):
        name = path.name if path.parent == SYSTEMD else path.relative_to(ROOT)
        assert str(name) in text, name
