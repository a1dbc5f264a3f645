"""Stock vLLM beside vLLM + minlora on the offline tests' mixed batch, against HF + PEFT (fp32):
the comparison quoted in minlora/integrations/vllm/README.md.  Not a test: it shows a bug of
stock vLLM's CPU LoRA ops (rows without an adapter read the last slot's), which the tests do
not depend on.

    source scripts/vllm_env.sh && python tests/vllm_integration/stock_comparison.py [--arch llama|qwen2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

from vllm_assets import compare, mixed_rows, peft_greedy, write_assets

HERE = os.path.dirname(os.path.abspath(__file__))


def run(assets_json: str, rows_json: str, out: str, plugin: bool) -> dict:
    env = {**os.environ, "MINLORA_VLLM": "1" if plugin else "0"}
    subprocess.run([sys.executable, os.path.join(HERE, "run_offline.py"), assets_json, rows_json, out,
                    "--max-loras", "4"], env=env, check=True, capture_output=True, text=True)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        assets = write_assets(os.path.join(tmp, "assets"), args.arch)
        assets.save(os.path.join(tmp, "assets.json"))
        rows = mixed_rows(list(assets.adapters), seed=1)
        with open(os.path.join(tmp, "rows.json"), "w") as f:
            json.dump([asdict(r) for r in rows], f)
        want = peft_greedy(assets, rows)
        got = {name: run(os.path.join(tmp, "assets.json"), os.path.join(tmp, "rows.json"),
                         os.path.join(tmp, f"{name}.json"), plugin)["rows"]
               for name, plugin in (("stock", False), ("minlora", True))}
    print(f"{args.arch}, {len(rows)} rows ({sum(r.adapter is None for r in rows)} without an adapter), "
          "6 adapters of ranks 1-64 through 4 slots, fp32, greedy")
    print("| run | rows equal to HF + PEFT | rows without an adapter equal |")
    print("|---|---|---|")
    for name, rows_got in got.items():
        bad = compare(rows, want, rows_got)
        bad_rows = {int(b.split()[1]) for b in bad}
        base = [i for i, r in enumerate(rows) if r.adapter is None]
        print(f"| {name} | {len(rows) - len(bad)}/{len(rows)} | {sum(i not in bad_rows for i in base)}/{len(base)} |")
    i = next(i for i, r in enumerate(rows) if r.adapter is None)
    print(f"\nrow {i} (no adapter): HF + PEFT {want[i]['tokens']}, stock {got['stock'][i]['tokens']}, "
          f"minlora {got['minlora'][i]['tokens']}")


if __name__ == "__main__":
    main()
