"""The demo CLI (``python -m tofu_triton demo``) and the merge pictures it draws."""
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from tofu_triton.cli import main
from tofu_triton.cli.demo import clamp_note, synthetic_images
from tofu_triton.models import similar_names
from tofu_triton.visualize import merge_figure, merge_picture, save_merge_picture


def test_demo_prints_the_table_and_saves_pictures(tmp_path, capsys):
    assert main(["demo", "--model", "tiny", "--device", "cpu", "--batch", "2", "--iters", "1",
                 "--r", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "top-1 agree" in out and "cos logits" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "65 in every layer" in lines["unpatched"]
    # 64 patches + class token, r=4 in each of 6 layers.
    assert lines["ToMe"].endswith("65→61→57→53→49→45→41")
    assert lines["ToFu"].endswith("65→61→57→53→49→45→41")
    for mode in ("tome", "tofu"):
        with open(tmp_path / f"merge_{mode}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_runs_as_a_module(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "tofu_triton", "demo", "--model", "tiny", "--device", "cpu", "--batch", "1",
         "--iters", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "ToFu (tofu)" in done.stdout and (tmp_path / "merge_tofu.png").exists()


@pytest.mark.parametrize("argv", [[], ["demo", "--r", "-1"], ["demo", "--device", "tpu"], ["demo", "--batch", "0"]])
def test_demo_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_synthetic_images_are_deterministic_images():
    a, b = synthetic_images(3, 32, seed=5), synthetic_images(3, 32, seed=5)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.05


def test_merge_picture_paints_tokens_in_their_mean_colour(tmp_path):
    # 2x2 patches of 2x2 pixels. Token 0 holds patches 0 and 3, token 1 holds patch 1,
    # patch 2 was pruned (no token).
    image = torch.zeros(3, 4, 4)
    image[0, :2, :2] = 1.0  # patch 0: red
    image[2, 2:, 2:] = 1.0  # patch 3: blue
    image[1, :2, 2:] = 1.0  # patch 1: green
    source = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0]])  # a prefix row, then tokens
    pic = merge_picture(image, source, (2, 2))
    assert pic.shape == (4, 4, 3)
    assert pic[1, 0].tolist() == pytest.approx([0.5, 0.0, 0.5])  # inside patch 0, away from edges
    assert pic[3, 3].tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert pic[0, 3].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert pic[3, 0].max() < 0.5  # pruned: dimmed
    assert pic[0, 2].tolist() == [1.0, 1.0, 1.0]  # edge between token 0 and token 1
    path = save_merge_picture(str(tmp_path / "m.png"), image, source, (2, 2), "t")
    assert os.path.getsize(path) > 0
    legend = merge_figure(image, source, (2, 2)).axes[1].get_legend()
    assert legend is not None and "pruned" in legend.get_texts()[0].get_text()
    assert merge_figure(image, source[:, [0, 1, 3, 3]], (2, 2)).axes[1].get_legend() is None  # nothing pruned
    with pytest.raises(ValueError, match="grid"):
        merge_picture(image, source, (3, 3))


def _run_cli(*argv, **env):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "tofu_triton", *argv], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit_does_not_exist"], "unknown model 'vit_does_not_exist'"),
    (["--model", "resnet18"], "not a timm VisionTransformer"),
    (["--model", "tiny", "--pretrained"], "no pretrained weights"),
    # Offline, with an empty cache: at once, where timm's download retries for about a minute.
    (["--model", "vit_tiny_patch16_224", "--pretrained"], "not in the local cache and HF_HUB_OFFLINE is set"),
])
def test_demo_user_mistakes_are_one_line_errors(argv, message, tmp_path):
    done = _run_cli("demo", "--device", "cpu", "--out", str(tmp_path), *argv, HF_HUB_OFFLINE="1",
                    HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and message in done.stderr.strip().splitlines()[-1]


def test_unknown_model_suggests_the_closest_names_first():
    with pytest.raises(SystemExit, match="similar names: vit_base_patch16_224, "):
        main(["demo", "--model", "vit_base_patch16", "--device", "cpu"])
    names = ["convit_base", "samvit_base_patch16", "vit_base_patch16_384", "vit_base_patch16_224",
             "vit_base_patch16_18x2_224", "deit_base_patch16_224"]
    assert similar_names("vit_base_patch16", names, n=4) == [  # those it starts, by closeness, then look-alikes
        "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch16_18x2_224", "samvit_base_patch16"]
    assert similar_names("vit_base_patch16_244", names, n=2) == ["vit_base_patch16_224", "vit_base_patch16_384"]
    assert similar_names("resnet", names) == []


def test_unreachable_weights_fail_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    def no_network(request, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--model", "vit_tiny_patch16_224", "--pretrained", "--device", "cpu", "--out", str(tmp_path)])
    assert str(e.value) == ("--model vit_tiny_patch16_224: could not load pretrained weights (OSError: cannot reach "
                            "https://huggingface.co to download the pretrained weights of vit_tiny_patch16_224 "
                            "([Errno -2] Name or service not known); check the network, or run without pretrained "
                            "weights)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is visible")
def test_demo_cuda_without_gpu_is_a_one_line_error(tmp_path):
    done = _run_cli("demo", "--device", "cuda", "--model", "tiny", "--out", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr and "no CUDA GPU" in done.stderr


def test_demo_is_seeded_and_says_when_r_is_clamped(tmp_path, capsys):
    argv = ["demo", "--model", "tiny", "--device", "cpu", "--batch", "2", "--iters", "1", "--r", "20",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    second = capsys.readouterr().out

    def agreement(out):  # every column but images/s and speed-up
        return [line.split()[-4:] for line in out.splitlines() if line.startswith(("ToMe", "ToFu"))]

    assert agreement(first) == agreement(second)
    # Nb of 65, 45, 25, 13, 7 and 4 tokens caps each layer's r = 20:
    assert "r=20 is more than the last 4 of the 6 layers can remove" in first and "[20, 20, 12, 6, 3, 1]" in first
    assert "CPU figures" in first


def test_clamp_note_says_which_layers_are_clamped():
    assert clamp_note(4, [4, 4, 4]) == ""
    assert clamp_note(4, [4, 4, 3]).startswith("r=4 is more than the last of the 3 layers can remove")
    # 17 tokens, r = 9: Nb = 8 caps the first layer already, and so every one.
    assert clamp_note(9, [8, 4, 2]) == ("r=9 is more than any of the 3 layers can remove (a layer removes at most "
                                        "half of its non-prefix tokens): the schedule removes [8, 4, 2]")


def test_demo_without_matplotlib_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from tofu_triton.cli import main\n"
            f"sys.exit(main(['demo', '--model', 'tiny', '--device', 'cpu', '--batch', '1', '--iters', '1', "
            f"'--out', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 'no merge pictures: matplotlib is not installed (pip install "tofu-triton[demo]")' in done.stdout
    assert done.stdout.count("no merge pictures") == 1 and not list(tmp_path.glob("*.png"))


# --------------------------------------------------------------------------- demo-sd (Stable Diffusion UNet step)

SD_ARGS = ["demo-sd", "--model", "tiny", "--device", "cpu", "--size", "16", "--batch", "1", "--iters", "1"]


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs the UNet: on a CPU shared with other jobs (pytest-xdist, a second
    suite) OpenMP threads waiting on each other made the tiny UNet's step 50-100x slower; one thread is quick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sd_rows(out):
    """{first word of the label: the columns after it} for the table rows of demo-sd."""
    rows = {}
    for line in out.splitlines():
        for label in ("unpatched", "tomesd", "ToMe (tome)", "ToFu (tofu)"):
            if line.startswith(label + " "):
                rows[label.split()[0]] = line[len(label):].split()
    return rows


def test_demo_sd_prints_the_table_and_saves_the_picture(tmp_path, capsys, one_thread):
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")
    pytest.importorskip("tomesd", reason="tomesd is not installed (pip install -e \".[test]\")")
    assert main([*SD_ARGS, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ms/step" in out and "speed-up" in out and "rel. L2 err" in out and "cosine" in out
    assert "RANDOM weights" in out.splitlines()[0] and "only show that the machinery runs" in out
    rows = _sd_rows(out)
    assert set(rows) == {"unpatched", "tomesd", "ToMe", "ToFu"}
    assert rows["unpatched"][1:4] == ["1.00x", "0.0000", "1.0000"]
    # use_rand=False everywhere: tomesd and our tome mode compute the same step.
    assert rows["tomesd"][2:4] == rows["ToMe"][2:4]
    assert 0 < float(rows["ToFu"][2]) < 1 and 0 < float(rows["ToFu"][3]) <= 1
    # SD 1.5 layout: 5 of 16 blocks run at full resolution (2 down, 3 up).
    assert "merges in 5 of 16 transformer blocks" in out
    with open(tmp_path / "merge_sd.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"merge picture: {tmp_path / 'merge_sd.png'}" in out and "CPU figures" in out


def test_demo_sd_without_tomesd_says_so(tmp_path, capsys, monkeypatch, one_thread):
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")
    monkeypatch.setitem(sys.modules, "tomesd", None)  # makes `import tomesd` raise ImportError
    assert main([*SD_ARGS, "--model", "tiny-xl", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tomesd_line = next(line for line in out.splitlines() if line.startswith("tomesd "))
    assert tomesd_line.endswith("not installed (pip install tomesd==0.1.3)")
    assert set(_sd_rows(out)) == {"unpatched", "tomesd", "ToMe", "ToFu"}
    # SDXL layout: no attention at full resolution, so the default max_downsample is 2 and the picture is at 1/2.
    assert "max_downsample 2" in out.splitlines()[0] and "merges in 10 of 28 transformer blocks" in out
    assert (tmp_path / "merge_sd.png").exists()


@pytest.mark.parametrize("argv", [["--ratio", "1.5"], ["--ratio", "-0.1"], ["--size", "7"], ["--size", "0"],
                                  ["--model", "tiny-xl", "--size", "6"], ["--batch", "0"], ["--iters", "0"],
                                  ["--model", "sd3"], ["--max-downsample", "3"], ["--dtype", "bf16"]])
def test_demo_sd_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        main(["demo-sd", *argv])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, code, message", [
    (["--ratio", "1.5"], 2, "--ratio must be in [0, 1), got 1.5"),
    (["--size", "7"], 2, "--size must be a positive multiple of 8"),
    (["--dtype", "fp16"], 1, "--dtype fp16 is for CUDA only"),
])
def test_demo_sd_user_mistakes_are_one_line_errors(argv, code, message, tmp_path):
    done = _run_cli("demo-sd", "--device", "cpu", "--out", str(tmp_path), *argv)
    assert done.returncode == code
    assert "Traceback" not in done.stderr and message in done.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())  # refused before doing anything


def test_latent_merge_picture_shows_roles_and_groups(tmp_path):
    from tofu_triton import reference
    from tofu_triton.visualize import DESTINATION, KEPT, MERGED, merge_roles, save_latent_merge_picture

    h, w, r = 4, 6, 9
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(3))
    partition = reference.spatial_partition(h, w, 2, 2)
    match = reference.spatial_match(x, partition, r)
    role, holder = merge_roles(partition, match, image=1)
    assert torch.bincount(role, minlength=3).tolist() == [h * w - 6 - r, r, 6]  # 6 cells of 2x2
    assert (role[[0, 2, 4, 12, 14, 16]] == DESTINATION).all()  # top-left of each cell (no choice given)
    # A grid position is carried by the token that prune-and-unmerge copies back into it.
    positions = torch.arange(h * w, dtype=torch.float32).expand(2, -1)[..., None]
    back = reference.spatial_unmerge(reference.spatial_merge(positions, match, partition, "prune"), match, partition)
    assert torch.equal(holder, back[1, :, 0].long())
    assert (role[holder[role == MERGED]] == DESTINATION).all() and torch.equal(holder[role == KEPT],
                                                                               torch.nonzero(role == KEPT)[:, 0])
    path = save_latent_merge_picture(str(tmp_path / "m.png"), partition, match, (h, w), "t")
    assert os.path.getsize(path) > 0
    with pytest.raises(ValueError, match="grid"):
        save_latent_merge_picture(str(tmp_path / "n.png"), partition, match, (5, 5))


# --------------------------------------------------------------------------- what every subcommand shares


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"tofu-triton {version('tofu-triton')}\n"


@pytest.mark.parametrize("command, argv", [("demo", []), ("demo-sd", []), ("eval", ["--data", "."])])
def test_ctrl_c_is_one_line_and_exit_code_130(command, argv, monkeypatch, capsys, tmp_path):
    from tofu_triton.cli import COMMANDS

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(COMMANDS[command][0], "run", interrupted)
    assert main([command, *argv, *(["--out", str(tmp_path)] if command != "eval" else [])]) == 130
    assert capsys.readouterr().err == f"tofu-triton {command}: interrupted (Ctrl-C)\n"


def test_ctrl_c_in_a_running_demo(tmp_path):
    # A real SIGINT while the demo times its batches: one line, exit code 130, no traceback.
    import signal

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tofu_triton", "demo", "--model", "tiny", "--device", "cpu",
                             "--batch", "1", "--iters", "100000", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # A run started in the background (CI's may be) ignores SIGINT, and Python then
                            # never turns it into KeyboardInterrupt: give the demo the handler a terminal has.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "demo: tiny" in proc.stdout.readline()  # the header: the model is built and running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == "tofu-triton demo: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize("command", ["demo", "demo-sd"])
def test_out_that_is_a_file_is_a_one_line_error(command, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    for out, message in ((taken, f"--out {taken} is a file; give a folder"),
                         (taken / "sub", f"--out {taken / 'sub'}: {taken} is a file")):
        with pytest.raises(SystemExit) as e:
            main([command, "--device", "cpu", "--out", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_demo_sd_refuses_a_preset_that_cannot_fit(monkeypatch, tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")
    from tofu_triton.cli import sd_demo

    monkeypatch.setattr(sd_demo, "available_memory", lambda device: 2**30)
    with pytest.raises(SystemExit) as e:
        main(["demo-sd", "--model", "sd15", "--device", "cpu", "--out", str(tmp_path / "out")])
    # SD 1.5's UNet: 859 520 964 parameters (the published count), 4 bytes each.
    assert str(e.value) == ("--model sd15: its 0.9 G parameters need about 3 GiB (built in float32) and 1.0 GiB "
                            "are available on this machine; use --model tiny (the same layout at 32-64 channels)")
    assert not (tmp_path / "out").exists()
    setup = sd_demo.Setup("cpu", "fp32", "sd15", False, 8, 1, 1)
    monkeypatch.setattr(sd_demo, "available_memory", lambda device: 4 * 2**30)
    sd_demo.check_fits(setup)  # 3.2 GiB fit in 4
    monkeypatch.setattr(sd_demo, "available_memory", lambda device: 2**20)
    sd_demo.check_fits(setup._replace(name="tiny"))  # the small presets are never refused


def test_available_memory_reads_the_machine():
    from tofu_triton.cli.sd_demo import available_memory

    free = available_memory("cpu")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert free is not None and 0 < free <= total
