"""Real-vs-real floors: what FID / KID / IS / PP-PR read for two disjoint real sets of the same size.

Any generated-sample score at N must be read against this floor at the same N (FID is biased
upward at small N; KID is unbiased, so its floor is ~0). Domain features use the package's trained
classifiers (trained into $GENMOD_CACHE on first use); Inception uses the offline FID weights.

    python benchmarks/evals_floors.py --datasets shapes,fashion_mnist --domain-n 1000,2000 --inception-n 200
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genmod.evals.report import evaluate_images, real_floor, resolve_spaces


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="shapes,fashion_mnist")
    parser.add_argument("--domain-n", default="1000,2000")
    parser.add_argument("--inception-n", default="200", help="comma list; empty to skip (Inception: ~8 img/s on 2 CPU cores)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    metrics = ("fid", "kid", "isc", "pppr")
    rows = []
    for dataset in [d for d in args.datasets.split(",") if d]:
        plans = [("domain", int(n)) for n in args.domain_n.split(",") if n]
        plans += [("inception", int(n)) for n in args.inception_n.split(",") if n]
        for space_name, num in plans:
            space = resolve_spaces([space_name], dataset)[0]
            reference, reference_name, floor, floor_name = real_floor(dataset, num)
            started = time.time()
            # "floor" plays the generated set: test-split images against train-split images
            result = evaluate_images(floor, reference, [space], metrics=metrics, real_cache=reference_name,
                                     fake_cache=floor_name)
            values = result["spaces"][space_name]["model"]
            rows.append({"dataset": dataset, "features": space_name, "N": num, "seconds": round(time.time() - started, 1),
                         **{k: values.get(k) for k in ("fid", "kid", "kid_std", "isc", "p_precision", "p_recall")},
                         "extractor": {k: v for k, v in space.description.items() if k in ("test_accuracy", "sha256")}})
            print(json.dumps(rows[-1]), flush=True)
    header = "| dataset | features | N | FID | KID (± std) | IS | P-prec / P-rec | extractor | s |"
    print("\n" + header + "\n|" + "---|" * 9)
    for r in rows:
        isc = "n/a" if r["isc"] is None else f"{r['isc']:.3f}"
        extractor = (f"acc {r['extractor']['test_accuracy']:.3f}, " if "test_accuracy" in r["extractor"] else "") \
            + r["extractor"]["sha256"][:10]
        print(f"| {r['dataset']} | {r['features']} | {r['N']} | {r['fid']:.3f} | {r['kid']:.5f} ± {r['kid_std']:.5f} | "
              f"{isc} | {r['p_precision']:.3f} / {r['p_recall']:.3f} | {extractor} | {r['seconds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    raise SystemExit(main())
