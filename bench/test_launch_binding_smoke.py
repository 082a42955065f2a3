"""bench/launch_binding.py on its --small case: every launcher recorded once, Triton's binder built and timed."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(*args, interpret: bool):
    # Not measure.run_script: that one sets TRITON_INTERPRET=1 without CUDA, and this script needs the
    # compiled kernels' binder (it launches nothing, so it runs on any machine).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, os.path.join(HERE, "launch_binding.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_small_run_times_the_binding_of_every_launcher(tmp_path):
    done = _run("--small", "--out", str(tmp_path), interpret=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "launch_binding_cpu.json").read_text())["rows"]
    assert [row["kernel"] for row in rows] == ["_step_kernel", "_head_mean_kernel", "_match_kernel", "_select_kernel",
                                              "_merge_kernel", "_attention_kernel"]
    assert all(row["binder_us"] > 0 and row["launcher_python_us"] > 0 and row["arguments"] > 5 for row in rows)


def test_the_interpreter_is_refused_in_one_line(tmp_path):
    done = _run("--small", "--out", str(tmp_path), interpret=True)
    assert done.returncode == 2 and "without TRITON_INTERPRET=1" in done.stderr and "Traceback" not in done.stderr
