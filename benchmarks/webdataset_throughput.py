"""Items/s of the streaming loader (``WebDatasetStream`` + DataLoader) with 0 and 2 workers.

    python benchmarks/webdataset_throughput.py [--items 2048] [--size 64] [--resolution 32]

Writes ``items`` random RGB PNGs of ``size`` px as shards of 256 (a temp folder), then reads one
epoch at ``--resolution`` with random crops and flips, batch 32. Numbers depend on the machine's load.
"""
import argparse
import json
import tempfile
import time

import torch

from genmod.data import WebDatasetStream, collate
from genmod.data.shard_writer import write_shards


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, args.size, args.size, generator=g) * 2 - 1, "label": torch.tensor(i % 10),
              "caption": f"item {i}"} for i in range(args.items)]
    results = {}
    with tempfile.TemporaryDirectory() as out:
        info = json.load(open(write_shards(items, out, 256)))
        pattern = f"{out}/train-{{000000..{len(info['shards']) - 1:06d}}}.tar"
        for workers in (0, 2):
            stream = WebDatasetStream(pattern, image_size=args.resolution, random_crop=True, random_flip=True)
            stream.configure(32, num_workers=workers)
            loader = torch.utils.data.DataLoader(stream, batch_size=32, num_workers=workers, collate_fn=collate)
            start = time.perf_counter()
            count = sum(len(batch["caption"]) for batch in loader)
            results[f"workers={workers}"] = round(count / (time.perf_counter() - start), 1)
    print(json.dumps({"items_per_s": results, **vars(args)}))


if __name__ == "__main__":
    main()
