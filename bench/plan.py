"""Plan: `batcher plan` of a manifest expanding to 1,000,000 tasks (and 100,000, to show that
memory stays flat as the manifest grows).

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


if __name__ == "__main__":
    main()
