"""The accuracy of ``deltatune plan``: a markdown table of predicted against measured peaks from
the JSON files that ``deltatune plan --measure --json F`` writes (docs/results/plan/)::

    deltatune plan --model minilm --method lora --batch-size 32 --max-length 128 \\
        [--optimizer coap_adamw] [--gradient-checkpointing] --measure --json docs/results/plan/NAME.json
    .venv/bin/python bench/plan_table.py docs/results/plan

The tensor peak is measured by the allocator's own events (``deltatune.measure.allocator_peak``),
the process peak is the kernel's peak RSS of the same process during the first step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MB = 2 ** 20


def row(record: dict) -> str:
    run, plan, m = record["run"], record["plan"], record["measured"]
    what = f"{run['method']}, {run['optimizer']}" + (", checkpointing" if run["gradient_checkpointing"] else "")
    if run["model"] == "smollm2":       # records from before the planner planned the chunked loss lack the field
        what += ", chunked loss" if run.get("chunked_loss", False) else ", plain loss"
    tensor = 100 * (plan["peak_bytes"] / m["tensor_peak_bytes"] - 1)
    process = 100 * (plan["process_peak_bytes"] / m["process_peak_bytes"] - 1)
    return (f"| {run['model']} | {run['batch_size']} x {run['max_length']} | {what} | {plan['peak_bytes'] / MB:,.0f} | "
            f"{m['tensor_peak_bytes'] / MB:,.0f} | {tensor:+.1f} % | {plan['process_peak_bytes'] / MB:,.0f} | "
            f"{m['process_peak_bytes'] / MB:,.0f} | {process:+.1f} % |")


def main(folder: str) -> int:
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    records = [r for r in records if r.get("measured")]
    if not records:
        print(f"{folder}: no plan JSON with a measurement (deltatune plan --measure --json F)", file=sys.stderr)
        return 2
    records.sort(key=lambda r: (r["run"]["model"] != "minilm", r["run"]["method"] != "lora", r["run"]["optimizer"],
                                r["run"]["batch_size"] * r["run"]["max_length"], r["run"].get("chunked_loss", False),
                                r["run"]["gradient_checkpointing"]))
    print("| model | batch | run | planned tensor peak (MB) | measured | error | planned process peak (MB) | "
          "measured peak RSS | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/plan"))
