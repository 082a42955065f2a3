"""bench/gpu_check.sh's time plan, from its dry run: the stages in the order of the GPU issues, every one of them
given time even when each stage before it uses all of its limit, and a stage whose script is missing skipped
with a line saying so."""
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
# The order of issue 30 (the tournaments between them where their scripts exist).
ORDER = ("tests", "export", "compile", "tournament-vit", "throughput", "probe", "tournament-sd", "sd", "dit",
         "san-memcheck", "san-racecheck", "san-synccheck", "determinism", "vit-sl", "bench", "summarize")
# vit-sl runs in the SD half of the two-part plan only.
KEPT = tuple(name for name in ORDER if name not in ("bench", "tournament-vit", "tournament-sd", "vit-sl"))
SETUP_S = 25  # env + install + wheels on the H200 of 2026-12-04: 12 + 11 + 1 s
SETUP = ("env", "install", "wheels", "bench")  # setup, and the stage that takes whatever is left


def plan(tmp_path, dry="full", **env):
    done = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, GPU_CHECK_DRY_RUN=dry, **env))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = done.stdout.split("gpu_check summary", 1)[1]
    rows = re.findall(r"^(\S+) +(?:dry run +(\d+)s|(no time left|not here))", summary, re.M)
    return {name: int(s) if s else state for name, s, state in rows}, done.stdout


def test_the_stages_run_in_the_issues_order_and_all_get_time_in_the_worst_case(tmp_path):
    limits, out = plan(tmp_path)
    assert [name for name in limits if name in ORDER] == [name for name in ORDER if name in limits], limits
    assert all(isinstance(limits.get(name), int) and limits[name] >= 10 for name in KEPT), limits
    assert limits["tests"] >= (60 if "wheels" not in limits else 40), limits  # .whl/ present: 20 s more setup
    assert sum(v for v in limits.values() if isinstance(v, int)) <= 540, limits
    for name in ("tournament-vit", "tournament-sd"):
        script = os.path.join(HERE, name.replace("-", "_") + ".py")
        if os.path.exists(script):
            assert isinstance(limits.get(name), int) and limits[name] >= 10, limits
        else:
            assert limits.get(name) == "not here", limits
            assert f"bench/{name.replace('-', '_')}.py is not in this checkout" in out


def test_with_the_usual_setup_every_kept_stage_gets_its_cap(tmp_path):
    limits, _ = plan(tmp_path, dry="1")
    kept = sum(v for name, v in limits.items() if isinstance(v, int) and name not in SETUP)
    assert kept + SETUP_S <= 540, limits  # so the real run, ~25 s of setup, leaves every kept stage its cap
    assert limits["tests"] >= 100, limits  # 14 files on 16 workers; 13 did not finish in 128 s on 12


def test_a_stage_switched_off_gives_its_time_to_the_others(tmp_path):
    everything, _ = plan(tmp_path)
    limits, _ = plan(tmp_path, GPU_CHECK_SKIP_SD="1", GPU_CHECK_SKIP_TESTS="1")
    assert "sd" not in limits and "tests" not in limits and "tournament-sd" not in limits
    before = everything["bench"] if isinstance(everything.get("bench"), int) else 0
    assert isinstance(limits.get("bench"), int) and limits["bench"] > before, (everything, limits)


def test_the_two_part_plan_splits_the_stages_and_gives_the_tournaments_their_time(tmp_path):
    vit, _ = plan(tmp_path, dry="1", GPU_CHECK_PART="vit", GPU_CHECK_BUDGET_S="480")
    sd, _ = plan(tmp_path, dry="1", GPU_CHECK_PART="sd", GPU_CHECK_BUDGET_S="320")
    vit_half = {"tests", "export", "compile", "tournament-vit", "throughput", "probe"}
    sd_half = {"tournament-sd", "sd", "dit", "san-memcheck", "san-racecheck", "san-synccheck", "determinism",
               "vit-sl"}
    assert vit_half - {"tournament-vit"} <= set(vit) and not sd_half & set(vit), vit
    assert sd_half - {"tournament-sd"} <= set(sd) and not vit_half & set(sd), sd
    assert vit["probe"] >= 60 and sd["sd"] >= 30 and sd["vit-sl"] >= 25, (vit, sd)
    for limits, name in ((vit, "tournament-vit"), (sd, "tournament-sd")):
        if os.path.exists(os.path.join(HERE, name.replace("-", "_") + ".py")):
            assert limits[name] >= 60, limits
    for limits, budget in ((vit, 480), (sd, 320)):
        kept = sum(v for n, v in limits.items() if isinstance(v, int) and n not in SETUP)
        assert kept + SETUP_S <= budget, limits


def test_the_plan_does_not_depend_on_how_fast_the_dry_run_runs(tmp_path):
    # CI's loaded 2-core machine took seconds over the dry run, and the last stages of a plan with no slack
    # fell under 10 s. A `date` whose clock jumps 4 s at every reading stands in for such a machine.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "date").write_text('#!/bin/bash\nif [ "$1" = "+%s" ]; then f="$(dirname "$0")/count"; '
                               'c=$(cat "$f" 2>/dev/null || echo 0); echo $((c + 1)) > "$f"; '
                               'echo $((1700000000 + 4 * c)); else exec /bin/date "$@"; fi\n')
    (shim / "date").chmod(0o755)
    steady, _ = plan(tmp_path / "a")
    slow, _ = plan(tmp_path / "b", PATH=f"{shim}:{os.environ['PATH']}")
    assert slow == steady
