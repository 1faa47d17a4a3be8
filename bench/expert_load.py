"""The routed-token load of a MoE run per layer and expert, as a CSV and a heatmap.

    tp-run generate --model MOE_DIR --tp 2 --moe ep --json ... > run.json
    python bench/expert_load.py run.json [--out bench/out/experts]

Reads the last JSON object of the file (`tp-run generate --json` prints its result as the last
line of stdout): its "experts" (LLM.expert_load(): per MoE layer the tokens routed to each
expert in prefill and decode, each rank's share and the imbalance) and its "tp". Writes
OUT/experts.csv (one row per layer and expert, with the rank holding it under --moe ep) and
OUT/experts.png (prefill and decode heatmaps; under --moe ep the ranks' expert ranges marked),
through the same code as `tp-bench sweep` writes for a MoE sweep's last run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tp_runtime.cli.sweep import write_expert_load


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("no JSON object in the input: run `tp-run generate ... --json` and save its stdout")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="stdout of `tp-run generate --json` (a file, or - for stdin)")
    p.add_argument("--out", type=Path, default=Path("bench/out/experts"))
    p.add_argument("--name", default="", help="what to call the run in the plot's title (default: the model's experts table alone)")
    args = p.parse_args(argv)
    result = last_json(sys.stdin.read() if args.result == "-" else Path(args.result).read_text())
    if "experts" not in result:
        raise SystemExit("the result has no 'experts': the model is not a mixture of experts")
    table = result["experts"]
    args.out.mkdir(parents=True, exist_ok=True)
    batch = len(result.get("outputs", [])) or 1
    write_expert_load({"tp": int(result.get("tp", 1)), "batch": batch, "modes": {table.get("parallel", "tp"): table}}, args.out,
                      args.name or "tp-run generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
