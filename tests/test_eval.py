"""``python -m tofu_triton eval`` on a tiny ImageFolder written by the test (random-init ViT, CPU)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tofu_triton.cli import eval as tev
from tofu_triton.cli import main
from tofu_triton.models import create_vit

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2"]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("cats", 3), ("dogs", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("use_torchvision", [True, False])
def test_image_folder_layout(folder, use_torchvision):
    if use_torchvision:
        pytest.importorskip("torchvision", reason="torchvision not installed; the PIL fallback is tested")
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=2)
    ds = tev.image_folder(str(folder), tev.eval_transform(model), use_torchvision=use_torchvision)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 5
    assert [t for _, t in ds.samples] == [0, 0, 0, 1, 1]
    x, t = ds[4]
    assert x.shape == (3, 64, 64) and t == 1


def test_pil_fallback_matches_torchvision(folder):
    pytest.importorskip("torchvision")
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=2)
    tf = tev.eval_transform(model)
    a = tev.image_folder(str(folder), tf, use_torchvision=True)
    b = tev.image_folder(str(folder), tf, use_torchvision=False)
    assert [p for p, _ in a.samples] == [p for p, _ in b.samples]
    assert torch.equal(a[2][0], b[2][0])


def test_evaluate_counts_are_exact(folder):
    # With 2 classes there is no top-5 (every class is in it); top-1 must equal a direct unpatched count.
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=2)
    ds = tev.image_folder(str(folder), tev.eval_transform(model))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        expected = (model(x).argmax(-1) == torch.tensor([0, 0, 0, 1, 1])).sum().item()
    rows = tev.evaluate(model, loader, [("tofu", 0), ("tome", 4), ("tofu", 4)])
    assert [(r["mode"], r["r"]) for r in rows] == [("tofu", 0), ("tome", 4), ("tofu", 4)]
    assert rows[0]["top1"] == pytest.approx(100.0 * expected / 5)
    assert rows[0]["tokens"] == [17] * 13
    assert rows[1]["tokens"][:4] == [17, 13, 9, 5] and rows[1]["tokens"][-1] == 2
    for row in rows:
        assert row["images"] == 5 and row["top5"] is None and row["correct5"] is None and row["images_per_s"] > 0
        assert len(row["batch_rates"]) == 2  # batches of 2, 2 and 1 image: only full ones give a rate
    limited = tev.evaluate(model, loader, [("tome", 2)], limit=3)
    assert limited[0]["images"] == 3


def test_evaluate_top5_with_more_than_5_classes(folder):
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=7, seed=3)
    ds = tev.image_folder(str(folder), tev.eval_transform(model))
    with torch.no_grad():
        logits = model(torch.stack([ds[i][0] for i in range(len(ds))]))
    target = torch.tensor([0, 0, 0, 1, 1])
    # The rank of each image's class among the 7 logits: top-5 holds it when fewer than 5 logits are larger.
    rank = (logits > logits.gather(1, target[:, None])).sum(-1)
    row = tev.evaluate(model, torch.utils.data.DataLoader(ds, batch_size=2), [("tofu", 0)])[0]
    assert (row["correct1"], row["correct5"]) == ((rank == 0).sum().item(), (rank < 5).sum().item())
    assert row["top5"] == pytest.approx(100.0 * (rank < 5).sum().item() / 5)


def test_eval_cli(folder, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["eval", *MODEL, "--data", str(folder), "--r", "0,4", "--mode", "tome,tofu", "--batch", "2",
               "--workers", "0", "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out.strip().splitlines()
    assert table[0].split()[:3] == ["mode", "r", "tokens"]
    assert [line.split()[:2] for line in table[1:]] == [["tome", "0"], ["tome", "4"], ["tofu", "0"], ["tofu", "4"]]
    assert "5 images, 2 classes" in captured.err and "warning" not in captured.err
    assert "note: images/s is not a speed measurement here: 2 full batches of 2 timed per row" in captured.err
    assert [line.split()[-1] for line in table[1:]] == ["-"] * 4  # no spread from 2 batches
    assert "img/s" not in captured.err  # no progress bar when stderr is not a terminal
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["top1"] == rows[2]["top1"]  # r=0 is the same model whatever the mode
    assert all(r["top5"] is None for r in rows) and [line.split()[5] for line in table[1:]] == ["-"] * 4
    assert "note: no top-5: the model has 5 classes or fewer" in captured.err


def test_eval_json_path_is_checked_before_the_run(folder, tmp_path, capsys, monkeypatch):
    def not_reached(args):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(tev, "run", not_reached)
    for path, message in ((tmp_path / "missing" / "x.json", f"the folder {tmp_path / 'missing'} does not exist"),
                          (tmp_path, f"--json {tmp_path} is a folder")):
        with pytest.raises(SystemExit) as e:
            main(["eval", *MODEL, "--data", str(folder), "--workers", "0", "--json", str(path)])
        assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_eval_warns_when_num_classes_is_fewer_than_the_folders(folder, tmp_path, capsys):
    (folder / "emus").mkdir()
    shutil.copy(folder / "cats" / "0.png", folder / "emus" / "0.png")
    out = tmp_path / "rows.json"
    assert main(["eval", *MODEL, "--data", str(folder), "--r", "0", "--workers", "0", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: the model has 2 classes and {folder} has 3 class folders" in err
    assert "the images of the last 1 folders can never be classified right" in err
    row = json.loads(out.read_text())["rows"][0]
    assert row["images"] == 6 and row["top5"] is None and row["correct1"] <= 5


def test_eval_cli_errors(folder):
    with pytest.raises(SystemExit):
        main(["eval", *MODEL, "--data", str(folder), "--mode", "bogus", "--workers", "0"])
    with pytest.raises(SystemExit):
        main(["eval", *MODEL, "--data", str(folder / "missing"), "--workers", "0"])
    with pytest.raises(SystemExit):
        main(["eval", *MODEL, "--data", str(folder), "--r", "-1", "--workers", "0"])
    with pytest.raises(SystemExit, match="VisionTransformer"):
        main(["eval", "--model", "resnet18", "--num-classes", "2", "--data", str(folder), "--workers", "0"])


@pytest.mark.parametrize("layout, message", [
    ({}, "has no class folders; it needs one sub-folder per class"),
    ({"a.png": b"x", "b.jpg": b"x"}, "has 2 images but no class folders"),
    ({"cats/readme.txt": b"x", "dogs/0.png": b"x"}, "1 of 2 class folders hold no images"),
])
def test_eval_folder_mistakes_are_one_line_errors(layout, message, tmp_path):
    for name, data in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(SystemExit) as e:
        main(["eval", *MODEL, "--data", str(tmp_path), "--workers", "0"])
    assert message in str(e.value) and str(e.value).startswith(f"--data {tmp_path}") and "\n" not in str(e.value)


def test_eval_triton_backend_on_the_cpu_is_a_one_line_error(folder, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py switches the interpreter on
    with pytest.raises(SystemExit, match="--backend triton runs the Triton kernels, which need a CUDA GPU"):
        main(["eval", *MODEL, "--data", str(folder), "--device", "cpu", "--backend", "triton", "--workers", "0"])


def test_eval_skips_unreadable_images_and_counts_them(folder, tmp_path, capsys):
    (folder / "cats" / "garbage.png").write_bytes(b"not an image")
    whole = (folder / "dogs" / "0.png").read_bytes()
    (folder / "dogs" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "rows.json"
    assert main(["eval", *MODEL, "--data", str(folder), "--r", "0", "--batch", "4", "--workers", "0",
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    for path in (folder / "cats" / "garbage.png", folder / "dogs" / "truncated.png"):
        assert f"warning: skipped {path}: cannot read it as an image" in err
    assert "2 unreadable images were skipped" in err and "over the 5 images read" in err
    row = json.loads(out.read_text())["rows"][0]
    assert (row["images"], row["skipped"]) == (5, 2)


def test_rate_spread_and_the_speed_note():
    rows = [tev.summary_row("tofu", 0, [17, 17], 10, 5, 10, 1.0, [100.0, 102.0, 98.0, 100.0, 110.0])]
    assert tev.rate_spread(rows[0]) == pytest.approx(0.06)  # (110 - 98) / (2 * 100)
    assert tev.format_rows(rows).splitlines()[1].endswith("±6%") and tev.notes(rows, 2) == []
    rows.append(tev.summary_row("tome", 4, [17, 13], 10, 5, 10, 1.0, [100.0]))
    assert tev.rate_spread(rows[1]) is None and tev.format_rows(rows).splitlines()[2].endswith(" -")
    assert tev.notes(rows, 2) == ["note: images/s is not a speed measurement here: 1 full batch of 2 timed per row, "
                                  "fewer than 5 (give at least 10 images or a smaller --batch; bench/throughput.py "
                                  "measures speed)"]


def test_eval_module_entry_point(folder):
    res = subprocess.run([sys.executable, "-m", "tofu_triton", "eval", *MODEL, "--data", str(folder), "--r", "2",
                          "--workers", "0", "--limit", "2"], capture_output=True, text=True, check=True)
    assert res.stdout.splitlines()[1].split()[:4] == ["tofu", "2", "17→2", "2"]


def test_evaluate_progress_bar(folder, capsys):
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=2)
    loader = torch.utils.data.DataLoader(tev.image_folder(str(folder), tev.eval_transform(model)), batch_size=2)
    tev.evaluate(model, loader, [("tome", 2)], progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "img/s" in err and "tome r=2 top-1" in err


def test_eval_warns_when_class_counts_differ(folder, capsys):
    rc = main(["eval", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--data", str(folder), "--r", "0",
               "--workers", "0", "--limit", "2"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: the model has 1000 classes" in err and "2 class folders" in err
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--data", str(folder), "--r", "0",
                 "--workers", "0", "--limit", "2", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_default_workers_follow_the_machine():
    assert 1 <= tev.default_workers() <= 8


def _eval_json(tmp_path, folder, name, *extra, launcher=()):
    out = tmp_path / f"{name}.json"
    cmd = [*launcher, *MODEL, "--data", str(folder), "--tokens", "0,4", "--mode", "tome,tofu", "--batch", "2",
           "--workers", "0", "--json", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text()), res


def test_torchrun_two_processes_give_the_single_process_counts(folder, tmp_path):
    # Real torchrun processes on the CPU (gloo): the documented command.
    entry = shutil.which("tofu-triton")
    program = ["--no-python", entry, "eval"] if entry else ["-m", "tofu_triton", "eval"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *program]
    one, _ = _eval_json(tmp_path, folder, "one", launcher=[sys.executable, "-m", "tofu_triton", "eval"])
    two, res = _eval_json(tmp_path, folder, "two", launcher=torchrun)
    assert two["processes"] == 2 and one["processes"] == 1
    for a, b in zip(one["rows"], two["rows"]):
        assert (a["mode"], a["r"], a["tokens"]) == (b["mode"], b["r"], b["tokens"])
        assert (a["images"], a["correct1"], a["correct5"]) == (b["images"], b["correct1"], b["correct5"]) == \
            (5, a["correct1"], None)
        assert a["top1"] == b["top1"]
    assert res.stdout.count("mode") == 1  # only rank 0 prints the table


def test_torchrun_shards_do_not_overlap():
    from tofu_triton.cli.eval import _Distributed

    shards = []
    for rank in range(3):
        d = _Distributed.__new__(_Distributed)
        d.rank, d.world = rank, 3
        shards.append(d.shard(8))
    assert sorted(i for s in shards for i in s) == list(range(8))


def test_checkpoint_loads_the_same_model_as_its_seed(folder, tmp_path):
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=2, seed=7)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    seeded, _ = _eval_json(tmp_path, folder, "seeded", "--seed", "7",
                           launcher=[sys.executable, "-m", "tofu_triton", "eval"])
    loaded, _ = _eval_json(tmp_path, folder, "loaded", "--seed", "1", "--checkpoint", str(tmp_path / "ckpt.pt"),
                           launcher=[sys.executable, "-m", "tofu_triton", "eval"])
    assert [r["correct1"] for r in seeded["rows"]] == [r["correct1"] for r in loaded["rows"]]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="--checkpoint .*bad.pt: cannot read it"):
        main(["eval", *MODEL, "--data", str(folder), "--workers", "0", "--checkpoint", str(tmp_path / "bad.pt")])
    torch.save({"head.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    keys = len(model.state_dict())
    with pytest.raises(SystemExit) as e:
        main(["eval", *MODEL, "--data", str(folder), "--workers", "0", "--checkpoint", str(tmp_path / "other.pt")])
    assert str(e.value) == (f"--checkpoint {tmp_path / 'other.pt'}: does not fit the model ({keys - 1} missing keys: "
                            f"cls_token, pos_embed, patch_embed.proj.weight and {keys - 4} more; 1 size mismatch: "
                            "head.weight (3, 3) vs (2, 192) in the model)")
    state = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=3).state_dict()
    state["head_dist.weight"] = state.pop("head.weight")
    torch.save(state, tmp_path / "three.pt")
    with pytest.raises(SystemExit) as e:
        main(["eval", *MODEL, "--data", str(folder), "--workers", "0", "--checkpoint", str(tmp_path / "three.pt")])
    assert str(e.value).endswith("does not fit the model (1 missing key: head.weight; 1 unexpected key: "
                                 "head_dist.weight; 1 size mismatch: head.bias (3,) vs (2,) in the model)")
