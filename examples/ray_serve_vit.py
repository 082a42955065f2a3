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
    # Build the model here once: a mistyped name, or pretrained weights that cannot be downloaded, is a
    # one-line error now, not replicas that Ray restarts forever. The weights land in the local cache, where
    # the replicas on this machine find them.
    load_model(args.model, args.pretrained, seed=0)

    import ray
    from ray import serve

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
