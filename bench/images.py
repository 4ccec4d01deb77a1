"""Images: b64 and url workloads of 1024x1024 images; tasks/s and batcher's peak RSS. Then
derived files: the same originals made into WebP plus two sizes by a run that sends nothing
(images/s, peak RSS), and a run paced at 20 tasks/s with and without ``outputs`` (tasks/s).

The server adds grain so each PNG weighs what a photograph does (~3 MB). Decoding and writing
must never hold more than a few images in memory at once: peak RSS should stay near
concurrency x payload, not grow with the number of tasks.

    python bench/images.py [--tasks 200] [--concurrency 16] [--derive-only]
"""

from __future__ import annotations

import argparse

from common import batcher, run_child, start_server, workdir, write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--derive-only", action="store_true", help="only the derive cases")
    args = parser.parse_args()
    # Photo-sized payloads: about 3 MB per 1024x1024 PNG, 4 MB once in base64.
    server = start_server(max_records=None, image_grain=True)
    try:
        for fmt in () if args.derive_only else ("b64_json", "url"):
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
            result = run_child(batcher("run", "images.yaml", "--no-progress"), folder,
                               own_rss=True)
            files = list((folder / "output/images/big").rglob("*.png"))
            size = sum(f.stat().st_size for f in files) / len(files) / 1024 if files else 0
            print(f"images {fmt}: {args.tasks} 1024x1024 images (avg {size:.0f} KiB) at "
                  f"concurrency {args.concurrency}: {args.tasks / result.seconds:.1f} tasks/s, "
                  f"peak RSS {result.peak_rss_mb:.0f} MB, exit {result.exit_code}")
        derive(server.api_url, args.tasks, args.concurrency)
    finally:
        server.stop_thread()


OUTPUTS = "{format: webp, quality: 85, sizes: {thumb: 256, card: 768}, metadata: true}"


def derive_manifest(api_url: str, tasks: int, concurrency: int, *, rate: str,
                    outputs: str | None) -> str:
    return f"""
        name: derive
        providers:
          bench: {{base_url: "{api_url}", concurrency: {concurrency}, rate_limit: {rate}}}
        jobs:
          - name: big
            type: image
            provider: bench
            model: flux.1-dev
            prompt: "A large poster"
            seeds: {tasks}
            params: {{size: 1024x1024, response_format: b64_json}}
    """ + (f"        outputs: {outputs}\n" if outputs else "")


def derive(api_url: str, tasks: int, concurrency: int) -> None:
    # Derivation alone: originals made by a first run, then outputs added (no request).
    folder = workdir("images-derive")
    write(folder / "derive.yaml", derive_manifest(api_url, tasks, concurrency, rate="null",
                                                  outputs=None))
    first = run_child(batcher("run", "derive.yaml", "--no-progress"), folder, own_rss=True)
    write(folder / "derive.yaml", derive_manifest(api_url, tasks, concurrency, rate="null",
                                                  outputs=OUTPUTS))
    result = run_child(batcher("run", "derive.yaml", "--no-progress"), folder, own_rss=True)
    made = len(list((folder / "output/derive/big").rglob("*.webp")))
    print(f"derive: {tasks} 1024x1024 originals -> WebP + 2 sizes ({made} files) with no "
          f"request: {tasks / result.seconds:.1f} images/s, peak RSS {result.peak_rss_mb:.0f} "
          f"MB, exit {first.exit_code}/{result.exit_code}")
    # A run paced at 20 tasks/s, with and without outputs.
    for outputs in (None, OUTPUTS):
        folder = workdir(f"images-paced-{'outputs' if outputs else 'plain'}")
        write(folder / "derive.yaml", derive_manifest(api_url, tasks, concurrency, rate="20/s",
                                                      outputs=outputs))
        result = run_child(batcher("run", "derive.yaml", "--no-progress"), folder,
                           own_rss=True)
        print(f"paced 20/s, {'with' if outputs else 'without'} outputs: {tasks} tasks at "
              f"{tasks / result.seconds:.1f} tasks/s, peak RSS {result.peak_rss_mb:.0f} MB, "
              f"exit {result.exit_code}")


if __name__ == "__main__":
    main()
