"""Stage runner: skip when up to date, re-run on change, restart after failure, lock."""

import dataclasses

import pytest

from nppnet_tf.config import RunConfig, RunSection, SynthConfig
from pipeline.runner import (
    EXIT_LOCKED,
    RunLock,
    Stage,
    StageFailed,
    fingerprint_of,
    run_stages,
)


def make_config(tmp_path, seed=0):
    return RunConfig(
        run=RunSection(work_dir=str(tmp_path)), synth=SynthConfig(seed=seed)
    )


class Recorder:
    def __init__(self):
        self.calls = []
        self.fail = set()

    def stage(self, name, sections):
        def run(context):
            self.calls.append(name)
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            upstream = [v["fingerprint"] for v in context.results.values()]
            return {
                "fingerprint": fingerprint_of(
                    name, upstream, context.config.synth.seed
                )
            }

        return Stage(name, sections, run)


def test_second_run_skips_everything(tmp_path):
    rec = Recorder()
    stages = [rec.stage("a", ("synth",)), rec.stage("b", ("data",))]
    first = run_stages(stages, make_config(tmp_path))
    assert [r.status for r in first] == ["ran", "ran"]
    second = run_stages(stages, make_config(tmp_path))
    assert [r.status for r in second] == ["skipped", "skipped"]
    assert rec.calls == ["a", "b"]


def test_config_change_reruns_that_stage_and_after(tmp_path):
    rec = Recorder()
    stages = [
        rec.stage("a", ("data",)),
        rec.stage("b", ("synth",)),
        rec.stage("c", ("loss",)),
    ]
    run_stages(stages, make_config(tmp_path))
    rec.calls.clear()
    records = run_stages(stages, make_config(tmp_path, seed=5))
    assert [r.status for r in records] == ["skipped", "ran", "ran"]
    assert rec.calls == ["b", "c"]


def test_failed_stage_restarts_there(tmp_path):
    rec = Recorder()
    stages = [rec.stage("a", ()), rec.stage("b", ()), rec.stage("c", ())]
    rec.fail = {"b"}
    with pytest.raises(StageFailed, match="stage b failed: b broke"):
        run_stages(stages, make_config(tmp_path))
    assert (tmp_path / "stages" / "b.json").read_text().count('"failed"') == 1
    rec.fail = set()
    rec.calls.clear()
    records = run_stages(stages, make_config(tmp_path))
    assert [r.status for r in records] == ["skipped", "ran", "ran"]
    assert rec.calls == ["b", "c"]


def test_from_and_force(tmp_path):
    rec = Recorder()
    stages = [rec.stage("a", ()), rec.stage("b", ())]
    run_stages(stages, make_config(tmp_path))
    rec.calls.clear()
    run_stages(stages, make_config(tmp_path), from_stage="b")
    assert rec.calls == ["b"]
    rec.calls.clear()
    run_stages(stages, make_config(tmp_path), force=True)
    assert rec.calls == ["a", "b"]
    with pytest.raises(ValueError, match="--from 'zz'"):
        run_stages(stages, make_config(tmp_path), from_stage="zz")


def test_deleted_output_reruns(tmp_path):
    out = tmp_path / "out.txt"

    def run(context):
        out.write_text("x")
        return {"path": str(out), "fingerprint": "f"}

    stage = Stage(
        "w", (), run, outputs_exist=lambda o: (tmp_path / "out.txt").exists()
    )
    run_stages([stage], make_config(tmp_path))
    out.unlink()
    records = run_stages([stage], make_config(tmp_path))
    assert records[0].status == "ran" and out.exists()


def test_always_run_stage_keeps_downstream_skipped_when_fingerprint_same(
    tmp_path,
):
    rec = Recorder()
    calls = []

    def checker(context):
        calls.append(1)
        return {"fingerprint": "same", "skipped": len(calls) > 1}

    stages = [
        Stage("check", (), checker, always_run=True),
        rec.stage("after", ()),
    ]
    run_stages(stages, make_config(tmp_path))
    records = run_stages(stages, make_config(tmp_path))
    assert [r.status for r in records] == ["skipped", "skipped"]
    assert len(calls) == 2 and rec.calls == ["after"]


def test_lock_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(StageFailed) as info:
            with RunLock(tmp_path):
                pass
        assert info.value.exit_code == EXIT_LOCKED
        assert "pid=" in str(info.value)
    with RunLock(tmp_path):  # released
        pass


def test_frozen_dataclass_config_used_in_hash(tmp_path):
    config = make_config(tmp_path)
    assert dataclasses.is_dataclass(config)
