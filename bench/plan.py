"""Plan: `batcher plan` of a manifest expanding to 1,000,000 tasks (and 100,000, to show that
memory stays flat as the manifest grows), and of a vars_file of 1,000,000 CSV rows.

    python bench/plan.py
"""

from __future__ import annotations

from common import batcher, run_child, workdir, write


def manifest_text(prompts: int, values: int, seeds: int) -> str:
    names = ", ".join(f"v{i}" for i in range(values))
    texts = ", ".join(f'"Prompt {i} about {{thing}}"' for i in range(prompts))
    return f"""
        name: plan-{prompts * values * seeds}
        jobs:
          - name: grid
            type: image
            provider: local
            models: [flux.1-schnell, stable-diffusion-3.5-medium]
            prompts: [{texts}]
            vars: {{thing: [{names}]}}
            seeds: {seeds}
            params: {{size: 512x512}}
    """


def main() -> None:
    folder = workdir("plan")
    for prompts, values, seeds in ((50, 100, 10), (100, 100, 50)):
        total = prompts * values * seeds * 2
        path = write(folder / f"plan-{total}.yaml", manifest_text(prompts, values, seeds))
        result = run_child(batcher("plan", str(path)), folder)
        if result.exit_code != 0:
            raise SystemExit(result.stderr)
        print(f"plan: {total:,} tasks in {result.seconds:.2f} s, peak RSS "
              f"{result.peak_rss_mb:.0f} MB")
    rows = 1_000_000
    csv_path = folder / "products.csv"
    with csv_path.open("w") as handle:
        handle.write("sku,name\n")
        handle.writelines(f"SKU-{i:07d},Product number {i}\n" for i in range(rows))
    path = write(folder / "plan-csv.yaml", """
        name: plan-csv
        jobs:
          - name: catalogue
            type: image
            provider: local
            model: flux.1-schnell
            vars_file: products.csv
            prompt: "A studio photo of {name} ({sku})"
            params: {size: 512x512}
    """)
    result = run_child(batcher("plan", str(path)), folder, own_rss=True)
    if result.exit_code != 0:
        raise SystemExit(result.stderr)
    print(f"plan: a vars_file of {rows:,} CSV rows in {result.seconds:.2f} s, peak RSS "
          f"{result.peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
