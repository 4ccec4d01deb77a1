"""Images: b64 and url workloads of 1024x1024 images; tasks/s and batcher's peak RSS.

The server adds grain so each PNG weighs what a photograph does (~3 MB). Decoding and writing
must never hold more than a few images in memory at once: peak RSS should stay near
concurrency x payload, not grow with the number of tasks.

    python bench/images.py [--tasks 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse

from common import batcher, run_child, start_server, workdir, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    # Photo-sized payloads: about 3 MB per 1024x1024 PNG, 4 MB once in base64.
    server = start_server(max_records=None, image_grain=True)
    try:
        for fmt in ("b64_json", "url"):
            folder = workdir(f"images-{fmt}")
            write(folder / "images.yaml", f"""
                name: images
                providers:
                  bench: {{base_url: "{server.api_url}", concurrency: {args.concurrency},
                           rate_limit: null}}
                jobs:
                  - name: big
                    type: image
                    provider: bench
                    model: flux.1-dev
                    prompt: "A large poster"
                    seeds: {args.tasks}
                    params: {{size: 1024x1024, response_format: {fmt}}}
            """)
            result = run_child(batcher("run", "images.yaml", "--no-progress"), folder)
            files = list((folder / "output/images/big").rglob("*.png"))
            size = sum(f.stat().st_size for f in files) / len(files) / 1024 if files else 0
            print(f"images {fmt}: {args.tasks} 1024x1024 images (avg {size:.0f} KiB) at "
                  f"concurrency {args.concurrency}: {args.tasks / result.seconds:.1f} tasks/s, "
                  f"peak RSS {result.peak_rss_mb:.0f} MB, exit {result.exit_code}")
    finally:
        server.stop_thread()


if __name__ == "__main__":
    main()
