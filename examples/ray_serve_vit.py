"""Serve a ToFu-patched timm ViT with Ray Serve (the deployment is ``tofu_triton.serve``).

One machine (starts a local Ray, serves on http://127.0.0.1:8000/ until Ctrl-C):

    pip install -e ".[serve]"
    python examples/ray_serve_vit.py --model vit_base_patch16_224 --pretrained --tokens 16 --replicas 2
    curl --data-binary @cat.jpg http://127.0.0.1:8000/          # {"top5": [[281, 0.41], ...], "logits": [...]}

A Ray cluster (``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others,
tofu-triton installed on all): the same command with ``--address auto`` on any node. Each replica
takes one GPU when CUDA is visible (``--gpus-per-replica``), else ``--cpus-per-replica`` CPUs; Ray
places the replicas across the nodes.
"""
import argparse
import sys

from tofu_triton.cli.common import load_model
from tofu_triton.serve import build_app

INSTALL = 'pip install "tofu-triton[serve]"'  # Ray Serve and what it needs (starlette, uvicorn, ...)


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """p.error (one line, exit 2) for a value out of range: refused here, before Ray starts its processes,
    not by replicas that fail one after another."""
    if args.tokens < 0:
        p.error(f"--tokens must be >= 0 (tokens removed per block), got {args.tokens}")
    if args.replicas < 1:
        p.error(f"--replicas must be >= 1, got {args.replicas}")
    if args.max_batch < 1:
        p.error(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
        p.error(f"--gpus-per-replica must be >= 0, got {args.gpus_per_replica}")
    if args.cpus_per_replica <= 0:
        p.error(f"--cpus-per-replica must be > 0, got {args.cpus_per_replica}")
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be in 1..65535, got {args.port}")


def import_ray():
    """(ray, ray.serve), or SystemExit with one line saying what to install."""
    try:
        import ray
        from ray import serve
    except ImportError as e:  # ray missing, or ray without its [serve] part
        raise SystemExit(f"this example needs Ray Serve ({e.name or 'ray'} is not installed): {INSTALL}") from None
    return ray, serve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name or a tofu_triton.models preset")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--tokens", "--r", dest="tokens", type=int, default=16, help="tokens removed per block (r)")
    p.add_argument("--mode", default="tofu", choices=("tofu", "tome", "prune", "mlerp", "none"))
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16, help="largest batch @serve.batch forms")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 if CUDA is visible, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--address", default=None, help="a running Ray cluster ('auto'); default: start a local one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    check_arguments(p, args)
    ray, serve = import_ray()
    # Build the model here once: a mistyped name, or pretrained weights that cannot be downloaded, is a
    # one-line error now, not replicas that Ray restarts forever. The weights land in the local cache, where
    # the replicas on this machine find them.
    load_model(args.model, args.pretrained, seed=0)

    ray.init(address=args.address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args.model, args.tokens, args.mode, args.replicas, args.pretrained,
                            max_batch=args.max_batch, gpus_per_replica=args.gpus_per_replica,
                            cpus_per_replica=args.cpus_per_replica),
                  route_prefix="/", blocking=True)
    except KeyboardInterrupt:  # Ctrl-C is how this server is meant to stop
        print("stopping the server (Ctrl-C)", file=sys.stderr)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
