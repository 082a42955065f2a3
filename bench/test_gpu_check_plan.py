"""bench/gpu_check.sh's time plan, from its dry run: with the default budget every stage the GPU issue needs
gets time even when each one before it uses all of its limit."""
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
KEPT = ("tests", "sdcheck", "sd", "export", "determinism", "throughput", "probe", "summarize")


def plan(tmp_path, **env) -> dict:
    done = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, GPU_CHECK_DRY_RUN="full", **env))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = done.stdout.split("gpu_check summary", 1)[1]
    return {m[0]: m[1] for m in re.findall(r"^(\S+) +(?:dry run +(\d+)s|no time left)", summary, re.M)}


def test_every_kept_stage_gets_time_in_the_worst_case(tmp_path):
    limits = plan(tmp_path)
    assert all(limits.get(name) for name in KEPT), limits
    assert int(limits["tests"]) >= 90 and int(limits["sd"]) >= 60, limits
    assert sum(int(v) for v in limits.values() if v) <= 540, limits


def test_a_stage_switched_off_gives_its_time_to_the_others(tmp_path):
    limits = plan(tmp_path, GPU_CHECK_SKIP_SD="1", GPU_CHECK_SKIP_TESTS="1")
    assert "sd" not in limits and "tests" not in limits
    assert limits.get("bench") or limits.get("throughput-x"), limits  # the extras get what the two left
